//! Configuration: a TOML file overlaid by `REDCLOAK_*` environment variables
//! (`__` nests: `REDCLOAK_UPSTREAM__ADDRESS`), validated once into [`Config`].
//!
//! Every key name appears once, in the `Raw*` structs below. Unknown keys are
//! errors, so a typo cannot silently turn a setting off. Relative paths
//! resolve against the config file's folder. Secrets come from `*_file`
//! settings or from the environment; they are [`Secret`]s from here on and
//! no error message ever quotes them. There is no key that makes the upstream
//! connection plaintext or unauthenticated: CA, client certificate, key and
//! password are all required.

use crate::auth::lockout::LockoutPolicy;
use crate::crypto::KeyError;
use crate::crypto::keyring::{self, LegacyPlaintext};
use crate::kms::aws::AwsSettings;
use crate::kms::file::KeyringFile;
use crate::kms::pkcs11::Pkcs11Settings;
use crate::kms::vault::TransitSettings;
use crate::kms::{KeySources, Kms, KmsPolicy, Provider, ProviderSettings};
use crate::policy::UnknownCommands;
use crate::policy::known;
use crate::policy::rules::{Bind, Members, Mode, Rule};
use crate::resp::Limits;
use crate::secret::{RawSecret, Secret};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

const ENV_PREFIX: &str = "REDCLOAK_";
/// Upstream connections kept ready when `upstream.pool_idle` is not set.
const DEFAULT_POOL_IDLE: usize = 16;
/// One address (or uid) may hold this many client connections by default.
const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 2_000;
/// Variables holding key material (`[[encryption.keys]] env = "REDCLOAK_KEY_1"`)
/// share the prefix but are not settings: the overlay skips them.
const KEY_ENV_PREFIX: &str = "key_";

/// Secret keys and the variables that carry them. They are read verbatim,
/// not parsed as TOML values the way figment's `Env` parses other variables
/// (a password of `007` must stay `007`).
const SECRET_ENV: &[(&str, &str)] = &[
    ("upstream.password", "REDCLOAK_UPSTREAM__PASSWORD"),
    ("listen.auth.password", "REDCLOAK_LISTEN__AUTH__PASSWORD"),
];

/// Settings whose variables are text, read verbatim for the same reason: a
/// file mode of `0600` would otherwise become the number 600.
const TEXT_ENV: &[(&str, &str)] = &[(
    "listen.unix_socket_mode",
    "REDCLOAK_LISTEN__UNIX_SOCKET_MODE",
)];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("{key}: cannot read {}: {source}", path.display())]
    ReadSecret {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    profile: Profile,
    listen: RawListen,
    upstream: RawUpstream,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    shutdown: RawShutdown,
    encryption: Option<RawEncryption>,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    logging: RawLogging,
    #[serde(default)]
    reload: RawReload,
    #[serde(default)]
    scripts: Vec<RawScript>,
    audit: Option<RawAudit>,
    cluster: Option<RawClusterPolicy>,
}

/// `[cluster]`: how redcloak behaves in front of a Redis Cluster.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClusterPolicy {
    failover_wait: Option<String>,
    split_multikey: Option<bool>,
}

/// `[audit]`: the tamper-evident audit log.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    file: PathBuf,
    key_file: PathBuf,
    rotate_bytes: Option<u64>,
    checkpoint_every: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReload {
    watch_interval: Option<String>,
}

/// A `[[scripts]]` entry: a Lua script whose effect on values is known.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScript {
    name: String,
    body: String,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
    reply: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    address: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    #[serde(default)]
    log_key_names: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncryption {
    primary: Option<u32>,
    keyring_file: Option<PathBuf>,
    #[serde(default)]
    kms: BTreeMap<String, RawKms>,
    kms_policy: Option<RawKmsPolicy>,
    #[serde(default)]
    legacy_plaintext: RawLegacy,
    #[serde(default)]
    unknown_commands: RawUnknown,
    #[serde(default)]
    keys: Vec<RawKey>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawLegacy {
    #[default]
    Reject,
    Pass,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawUnknown {
    #[default]
    Refuse,
    Pass,
}

/// `[encryption.kms.NAME]`: one KMS provider.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
enum RawKms {
    VaultTransit {
        address: String,
        ca: Option<PathBuf>,
        token_file: PathBuf,
        #[serde(default = "transit_mount")]
        mount: String,
        key: String,
    },
    AwsKms {
        key_id: String,
        region: Option<String>,
        endpoint: Option<String>,
    },
    Pkcs11 {
        module: PathBuf,
        token_label: String,
        pin_file: PathBuf,
        key_label: String,
    },
}

fn transit_mount() -> String {
    "transit".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKmsPolicy {
    startup_timeout: Option<String>,
    revalidate_every: Option<String>,
    max_unreachable: Option<String>,
    request_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: u32,
    file: Option<PathBuf>,
    env: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    pattern: String,
    mode: RawMode,
    bind: Option<RawBind>,
    /// The older spelling: `true` is `bind = "key"`, `false` is `bind = "none"`.
    bind_key: Option<bool>,
    members: Option<RawMembers>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawMembers {
    Random,
    Deterministic,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawBind {
    Key,
    Rule,
    None,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawMode {
    Encrypt,
    Plaintext,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    address: Option<String>,
    #[serde(default)]
    allow_remote_plaintext: bool,
    unix_socket: Option<PathBuf>,
    unix_socket_mode: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_peer: Option<usize>,
    idle_timeout: Option<String>,
    tls: Option<RawListenTls>,
    auth: Option<RawAuth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListenTls {
    address: String,
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    username: Option<String>,
    password_file: Option<PathBuf>,
    password: Option<RawSecret>,
    max_failures: Option<u32>,
    global_max_failures: Option<u32>,
    failure_window: Option<String>,
    lockout_duration: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    address: Option<String>,
    cluster: Option<RawCluster>,
    sentinel: Option<RawSentinel>,
    server_name: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    password: Option<RawSecret>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    #[serde(default)]
    allow_admin: bool,
    plaintext_port_probe: Option<u16>,
    pool_idle: Option<usize>,
    release_idle_after: Option<String>,
    lanes: Option<usize>,
}

/// `upstream.cluster`: a Redis Cluster instead of one `address`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    seeds: Vec<String>,
    /// Verify each node against the hostname it announces
    /// (`cluster-announce-hostname`) instead of `upstream.server_name`.
    #[serde(default)]
    verify_announced_hostname: bool,
}

/// `upstream.sentinel`: the primary Redis Sentinel names, instead of one
/// `address`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSentinel {
    addresses: Vec<String>,
    master_name: String,
    /// The name every Sentinel's certificate must show (default
    /// `upstream.server_name`).
    server_name: Option<String>,
    /// Sentinel's TLS (default: upstream's).
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    /// Sentinel's ACL user (Sentinel's own, not the data nodes').
    username: Option<String>,
    password_file: Option<PathBuf>,
    password: Option<RawSecret>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_bulk_bytes: Option<usize>,
    max_request_bytes: Option<usize>,
    max_array_len: Option<usize>,
    max_inline_bytes: Option<usize>,
    max_reply_depth: Option<usize>,
    max_reply_bytes: Option<usize>,
    max_pending_requests: Option<usize>,
    client_write_timeout: Option<String>,
    request_read_timeout: Option<String>,
    max_buffered_bytes: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    grace_period: Option<String>,
}

/// How strict the startup checks are. Nothing relaxes upstream TLS,
/// certificate verification or AUTH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Production,
    Staging,
    Development,
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    pub profile: Profile,
    /// Files holding secrets (passwords, private keys, data keys), with the
    /// setting that names them: the startup checks look at their modes.
    pub secret_files: Vec<(&'static str, PathBuf)>,
    pub listen: ListenConfig,
    pub upstream: UpstreamConfig,
    pub limits: LimitsConfig,
    pub shutdown_grace_period: Duration,
    pub encryption: EncryptionConfig,
    /// The admin listener (/metrics, /healthz, /readyz), if any.
    pub metrics_address: Option<SocketAddr>,
    /// Security events may name keys (`[logging] log_key_names`).
    pub log_key_names: bool,
    /// Known Lua scripts: the shipped ones and `[[scripts]]`.
    pub scripts: known::Registry,
    /// `[audit]`: where the audit log goes (`None`: nowhere).
    pub audit: Option<crate::telemetry::audit::AuditConfig>,
    /// How often the files a reload reads are looked at for changes
    /// (`reload.watch_interval`, `None`: "off").
    pub reload_watch_interval: Option<Duration>,
}

#[derive(Debug)]
pub struct EncryptionConfig {
    /// The data keys: raw, and wrapped by a KMS (unwrapped by
    /// [`KeySources::keyring`]).
    pub keys: KeySources,
    pub rules: Vec<Rule>,
    pub unknown_commands: UnknownCommands,
    /// Keys whose bytes are all the same (all-zero, or an example like `AQEB...`).
    pub weak_key_ids: Vec<u32>,
}

#[derive(Debug)]
pub struct ListenConfig {
    pub tcp: Option<SocketAddr>,
    pub unix: Option<UnixListenConfig>,
    pub tls: Option<TlsListenConfig>,
    pub auth: Option<ClientAuthConfig>,
    pub max_connections: usize,
    /// Connections one peer (an IP address, or a unix-socket uid) may hold.
    pub max_connections_per_peer: usize,
    /// Close clients idle this long (`None`: never, as Redis's `timeout 0`).
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug)]
pub struct UnixListenConfig {
    pub path: PathBuf,
    pub mode: u32,
}

#[derive(Debug)]
pub struct TlsListenConfig {
    pub address: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug)]
pub struct ClientAuthConfig {
    pub username: Option<String>,
    /// Any of these is accepted: `password_file` holds one per line, so
    /// clients can move to a new one while the old still works.
    pub passwords: Vec<Secret>,
    pub lockout: LockoutPolicy,
}

#[derive(Debug)]
pub struct UpstreamConfig {
    /// Redis's address; with `cluster`, its first seed (where the startup
    /// checks that concern one node look).
    pub address: String,
    /// `upstream.cluster`: a Redis Cluster, routed per slot.
    pub cluster: Option<ClusterConfig>,
    /// `upstream.sentinel`: the primary is the one Sentinel names.
    pub sentinel: Option<SentinelConfig>,
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub username: Option<String>,
    pub password: Secret,
    pub connect_timeout: Duration,
    /// How long Redis may take to answer (plus a blocking command's own timeout).
    pub request_timeout: Duration,
    pub allow_admin: bool,
    pub plaintext_port_probe: Option<u16>,
    /// Upstream connections kept ready for new clients (0: none).
    pub pool_idle: usize,
    /// A client quiet this long on a clean connection gives it back
    /// (`None`: "off", clients keep theirs).
    pub release_idle_after: Option<Duration>,
    /// Shared upstream connections per (database, protocol); 0: none, every
    /// client gets a connection of its own.
    pub lanes: usize,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub seeds: Vec<String>,
    /// The name every node's certificate must show.
    pub naming: crate::cluster::topology::Naming,
    /// How long a request for a slot whose primary is gone waits for a
    /// replica's promotion (`cluster.failover_wait`, default 5 s).
    pub failover_wait: Duration,
    /// MGET, DEL, UNLINK, EXISTS and TOUCH across slots are split per slot
    /// and their replies merged (`cluster.split_multikey`, default off:
    /// CROSSSLOT, as from Redis).
    pub split_multikey: bool,
}

/// How to reach the Sentinels and which primary to ask them for. Every
/// Sentinel is reached over TLS (verified against `server_name`, with a
/// client certificate) and logged in as `username`.
#[derive(Debug)]
pub struct SentinelConfig {
    pub addresses: Vec<String>,
    pub master_name: String,
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub username: Option<String>,
    pub password: Secret,
}

#[derive(Debug)]
pub struct LimitsConfig {
    pub resp: Limits,
    pub max_pending_requests: usize,
    pub client_write_timeout: Duration,
    /// A request must arrive whole this long after its first byte.
    pub request_read_timeout: Duration,
    /// What all connections' buffers may hold before reading requests pauses.
    pub max_buffered_bytes: usize,
}

/// Loads `path`, overlays the environment, and validates.
/// The file and the environment, without the secrets the environment holds
/// (those never enter figment's value tree, which is not zeroized).
fn figment(path: &Path, secret_keys: &[&str]) -> Figment {
    let mut figment = Figment::new().merge(Toml::file_exact(path)).merge(
        Env::prefixed(ENV_PREFIX)
            .split("__")
            .ignore(secret_keys)
            .filter(|key| {
                !key.as_str()
                    .to_ascii_lowercase()
                    .starts_with(KEY_ENV_PREFIX)
            }),
    );
    for (key, variable) in TEXT_ENV {
        if let Ok(value) = std::env::var(variable) {
            figment = figment.merge(Serialized::default(key, value));
        }
    }
    figment
}

/// Every setting as written (file and environment, secrets left out), by
/// dotted name: a reload compares them to name what needs a restart. Holds
/// no secret: `load` refuses a secret written in the file, and secrets from
/// the environment are not read here.
pub fn settings(path: &Path) -> Result<std::collections::BTreeMap<String, String>, ConfigError> {
    let secret_keys: Vec<&str> = SECRET_ENV.iter().chain(TEXT_ENV).map(|(k, _)| *k).collect();
    let tree: figment::value::Value = figment(path, &secret_keys).extract().map_err(Box::new)?;
    let mut settings = std::collections::BTreeMap::new();
    flatten("", &tree, &mut settings);
    Ok(settings)
}

fn flatten(
    prefix: &str,
    value: &figment::value::Value,
    out: &mut std::collections::BTreeMap<String, String>,
) {
    match value {
        figment::value::Value::Dict(_, dict) => {
            for (key, value) in dict {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&name, value, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), render(other));
        }
    }
}

/// A setting's value without figment's tags (which differ between loads).
fn render(value: &figment::value::Value) -> String {
    use figment::value::Value;
    match value {
        Value::String(_, text) => format!("{text:?}"),
        Value::Char(_, c) => format!("{c:?}"),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => format!("{n:?}"),
        Value::Empty(_, _) => String::new(),
        Value::Dict(_, dict) => {
            let fields: Vec<String> = dict
                .iter()
                .map(|(k, v)| format!("{k}={}", render(v)))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(_, items) => {
            let items: Vec<String> = items.iter().map(render).collect();
            format!("[{}]", items.join(","))
        }
    }
}

impl Config {
    /// The files a reload reads: certificates, CAs, and every secret file
    /// (keys, passwords, data keys).
    pub fn reloaded_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.secret_files.iter().map(|(_, p)| p.clone()).collect();
        files.extend([self.upstream.ca.clone(), self.upstream.cert.clone()]);
        if let Some(sentinel) = &self.upstream.sentinel {
            files.extend([sentinel.ca.clone(), sentinel.cert.clone()]);
        }
        if let Some(kms) = &self.encryption.keys.kms {
            files.push(kms.file_path.clone());
        }
        if let Some(tls) = &self.listen.tls {
            files.push(tls.cert.clone());
            files.extend(tls.client_ca.clone());
        }
        files.sort();
        files.dedup();
        files
    }
}

pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let verbatim = || SECRET_ENV.iter().chain(TEXT_ENV);
    let secret_keys: Vec<&str> = verbatim().map(|(key, _)| *key).collect();
    // Secrets from the environment never enter figment's value tree (it is
    // not zeroized): they go straight into the raw config below.
    let env_secrets: Vec<(&str, RawSecret)> = SECRET_ENV
        .iter()
        .filter_map(|(key, variable)| {
            let value = zeroize::Zeroizing::new(std::env::var(variable).ok()?);
            Some((*key, RawSecret(value)))
        })
        .collect();
    let mut raw: RawConfig = figment(path, &secret_keys).extract().map_err(Box::new)?;
    // figment keeps copies of what it read that cannot be wiped: a secret
    // written in the file itself is refused (files and the environment only).
    let inline = [
        ("upstream.password", raw.upstream.password.is_some()),
        (
            "listen.auth.password",
            raw.listen
                .auth
                .as_ref()
                .is_some_and(|a| a.password.is_some()),
        ),
    ];
    if let Some((key, _)) = inline.iter().find(|(_, written)| *written) {
        let variable = SECRET_ENV
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| *v);
        return Err(invalid(
            key,
            format!(
                "a secret written in the configuration file is not accepted: put it in a file \
                 ({key}_file, mode 0600) or the environment ({variable})"
            ),
        ));
    }
    for (key, secret) in env_secrets {
        let slot = match key {
            "upstream.password" => &mut raw.upstream.password,
            _ => {
                &mut raw
                    .listen
                    .auth
                    .get_or_insert_with(RawAuth::default)
                    .password
            }
        };
        *slot = Some(secret);
    }
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Config::validate(raw, base)
}

impl Config {
    fn validate(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
        let secret_files = secret_files(&raw, base);
        Ok(Config {
            profile: raw.profile,
            secret_files,
            listen: validate_listen(raw.listen, base)?,
            upstream: {
                let mut upstream = validate_upstream(raw.upstream, base)?;
                let wait = raw
                    .cluster
                    .as_ref()
                    .and_then(|c| c.failover_wait.as_deref());
                if let Some(cluster) = &mut upstream.cluster {
                    cluster.failover_wait = parse_duration("cluster.failover_wait", wait, "5s")?;
                    cluster.split_multikey = raw
                        .cluster
                        .as_ref()
                        .and_then(|c| c.split_multikey)
                        .unwrap_or(false);
                } else if raw.cluster.is_some() {
                    return Err(invalid(
                        "cluster",
                        "is for a Redis Cluster: set upstream.cluster.seeds (or remove [cluster])",
                    ));
                }
                upstream
            },
            limits: validate_limits(raw.limits)?,
            shutdown_grace_period: parse_duration(
                "shutdown.grace_period",
                raw.shutdown.grace_period.as_deref(),
                "10s",
            )?,
            reload_watch_interval: match raw.reload.watch_interval.as_deref().map(str::trim) {
                Some("off") => None,
                text => match parse_duration("reload.watch_interval", text, "10s")? {
                    zero if zero.is_zero() => {
                        return Err(invalid(
                            "reload.watch_interval",
                            "0 is not an interval: set \"off\" to turn polling off",
                        ));
                    }
                    interval => Some(interval),
                },
            },
            encryption: validate_encryption(raw.encryption, base)?,
            metrics_address: raw
                .metrics
                .map(|m| parse_address("metrics.address", &m.address))
                .transpose()?,
            log_key_names: raw.logging.log_key_names,
            scripts: validate_scripts(raw.scripts)?,
            audit: match raw.audit {
                None => None,
                Some(audit) => Some(crate::telemetry::audit::AuditConfig {
                    file: resolve(base, audit.file),
                    key_file: resolve(base, audit.key_file),
                    rotate_bytes: audit.rotate_bytes.unwrap_or(64 * 1024 * 1024).max(4096),
                    checkpoint_every: parse_duration(
                        "audit.checkpoint_every",
                        audit.checkpoint_every.as_deref(),
                        "60s",
                    )?
                    .max(Duration::from_millis(100)),
                }),
            },
        })
    }
}

/// The shipped known scripts plus `[[scripts]]`, each entry proved.
fn validate_scripts(raw: Vec<RawScript>) -> Result<known::Registry, ConfigError> {
    let entries = raw
        .into_iter()
        .map(|s| known::ScriptEntry {
            name: s.name,
            body: s.body,
            keys: s.keys,
            args: s.args,
            reply: s.reply,
        })
        .collect();
    known::Registry::builtin()
        .with_entries(entries)
        .map_err(|e| invalid("scripts", e.to_string()))
}

fn validate_listen(raw: RawListen, base: &Path) -> Result<ListenConfig, ConfigError> {
    let tcp = raw
        .address
        .as_deref()
        .map(|a| parse_address("listen.address", a))
        .transpose()?;
    if let Some(address) = tcp
        && !address.ip().is_loopback()
        && !raw.allow_remote_plaintext
    {
        return Err(invalid(
            "listen.address",
            format!(
                "{address} is not a loopback address: plaintext clients would cross the network. \
                 Use [listen.tls] for remote clients, or set listen.allow_remote_plaintext = true"
            ),
        ));
    }
    let unix = match raw.unix_socket {
        None => None,
        Some(path) => Some(UnixListenConfig {
            path: resolve(base, path),
            mode: parse_mode(raw.unix_socket_mode.as_deref())?,
        }),
    };
    let tls = match raw.tls {
        None => None,
        Some(tls) => Some(TlsListenConfig {
            address: parse_address("listen.tls.address", &tls.address)?,
            cert: resolve(base, tls.cert),
            key: resolve(base, tls.key),
            client_ca: tls.client_ca.map(|p| resolve(base, p)),
        }),
    };
    if tcp.is_none() && unix.is_none() && tls.is_none() {
        return Err(invalid(
            "listen",
            "no listener: set listen.address, listen.unix_socket or [listen.tls]",
        ));
    }
    let auth = match raw.auth {
        None => None,
        Some(auth) => Some(ClientAuthConfig {
            lockout: validate_lockout(&auth)?,
            passwords: one_per_line(read_secret(
                "listen.auth.password",
                auth.password,
                auth.password_file,
                base,
            )?),
            username: auth.username,
        }),
    };
    let max_connections = positive("listen.max_connections", raw.max_connections, 10_000)?;
    let max_connections_per_peer = positive(
        "listen.max_connections_per_peer",
        raw.max_connections_per_peer,
        max_connections.min(DEFAULT_MAX_CONNECTIONS_PER_PEER),
    )?;
    let idle_timeout = match raw.idle_timeout.as_deref().map(str::trim) {
        None | Some("off") => None,
        text => Some(parse_duration("listen.idle_timeout", text, "0s")?),
    };
    Ok(ListenConfig {
        tcp,
        unix,
        tls,
        auth,
        max_connections,
        max_connections_per_peer,
        idle_timeout,
    })
}

fn validate_lockout(raw: &RawAuth) -> Result<LockoutPolicy, ConfigError> {
    let defaults = LockoutPolicy::default();
    let max_failures = positive(
        "listen.auth.max_failures",
        raw.max_failures.map(|n| n as usize),
        defaults.max_failures as usize,
    )?;
    let global_max_failures = positive(
        "listen.auth.global_max_failures",
        raw.global_max_failures.map(|n| n as usize),
        defaults.global_max_failures as usize,
    )?;
    Ok(LockoutPolicy {
        max_failures: max_failures as u32,
        global_max_failures: global_max_failures as u32,
        window: parse_duration(
            "listen.auth.failure_window",
            raw.failure_window.as_deref(),
            "60s",
        )?,
        duration: parse_duration(
            "listen.auth.lockout_duration",
            raw.lockout_duration.as_deref(),
            "300s",
        )?,
    })
}

fn validate_upstream(raw: RawUpstream, base: &Path) -> Result<UpstreamConfig, ConfigError> {
    let required = |key: &'static str, value: Option<PathBuf>, why: &str| {
        value
            .map(|p| resolve(base, p))
            .ok_or_else(|| invalid(key, format!("required: {why}")))
    };
    let (address, cluster_seeds) = match (raw.address, &raw.cluster, &raw.sentinel) {
        (Some(address), None, None) => (address, None),
        (None, Some(cluster), None) => match cluster.seeds.first() {
            Some(first) => (first.clone(), Some(cluster.seeds.clone())),
            None => {
                return Err(invalid(
                    "upstream.cluster.seeds",
                    "at least one host:port of a cluster node",
                ));
            }
        },
        (None, None, Some(sentinel)) => {
            if sentinel.addresses.is_empty() {
                return Err(invalid(
                    "upstream.sentinel.addresses",
                    "at least one host:port of a Sentinel (three or more, so a majority can agree)",
                ));
            }
            if raw.server_name.is_none() {
                return Err(invalid(
                    "upstream.server_name",
                    "required with upstream.sentinel: the name every primary's certificate must show (never the address Sentinel reports)",
                ));
            }
            // Where the primary is comes from Sentinel at start.
            (format!("sentinel:{}", sentinel.master_name), None)
        }
        (None, None, None) => {
            return Err(invalid(
                "upstream.address",
                "required: Redis's host:port (or upstream.cluster.seeds for a Redis Cluster, or upstream.sentinel for Sentinel)",
            ));
        }
        _ => {
            return Err(invalid(
                "upstream",
                "set exactly one of address (one Redis), cluster (a Redis Cluster) and sentinel (a primary Sentinel names)",
            ));
        }
    };
    let server_name = match raw.server_name {
        Some(name) => name,
        None => host_part(&address)
            .ok_or_else(|| invalid("upstream.address", "expected host:port"))?
            .to_owned(),
    };
    let cluster = cluster_seeds.map(|seeds| ClusterConfig {
        seeds,
        failover_wait: Duration::from_secs(5),
        split_multikey: false,
        naming: if raw
            .cluster
            .as_ref()
            .is_some_and(|c| c.verify_announced_hostname)
        {
            crate::cluster::topology::Naming::Announced
        } else {
            crate::cluster::topology::Naming::Configured(server_name.clone())
        },
    });
    let lanes = match raw.lanes {
        None => default_lanes(),
        Some(lanes) if lanes <= MAX_LANES => lanes,
        Some(lanes) => {
            return Err(invalid(
                "upstream.lanes",
                format!("{lanes} lanes: at most {MAX_LANES} (0 turns lanes off)"),
            ));
        }
    };
    let sentinel = match raw.sentinel {
        None => None,
        Some(sentinel) => Some(SentinelConfig {
            addresses: sentinel.addresses,
            master_name: sentinel.master_name,
            server_name: sentinel.server_name.unwrap_or_else(|| server_name.clone()),
            ca: resolve(base, sentinel.ca.or(raw.ca.clone()).unwrap_or_default()),
            cert: resolve(base, sentinel.cert.or(raw.cert.clone()).unwrap_or_default()),
            key: resolve(base, sentinel.key.or(raw.key.clone()).unwrap_or_default()),
            username: sentinel.username,
            password: read_secret(
                "upstream.sentinel.password",
                sentinel.password,
                sentinel.password_file,
                base,
            )?,
        }),
    };
    Ok(UpstreamConfig {
        sentinel,
        ca: required(
            "upstream.ca",
            raw.ca,
            "the CA that signed Redis's certificate (Redis is always verified)",
        )?,
        cert: required(
            "upstream.cert",
            raw.cert,
            "redcloak's client certificate (the upstream connection is always mutual TLS)",
        )?,
        key: required("upstream.key", raw.key, "the private key of upstream.cert")?,
        password: read_secret("upstream.password", raw.password, raw.password_file, base)?,
        username: raw.username,
        connect_timeout: parse_duration(
            "upstream.connect_timeout",
            raw.connect_timeout.as_deref(),
            "5s",
        )?,
        request_timeout: parse_duration(
            "upstream.request_timeout",
            raw.request_timeout.as_deref(),
            "10s",
        )?,
        allow_admin: raw.allow_admin,
        plaintext_port_probe: raw.plaintext_port_probe,
        pool_idle: raw.pool_idle.unwrap_or(DEFAULT_POOL_IDLE),
        release_idle_after: match raw.release_idle_after.as_deref().map(str::trim) {
            Some("off") => None,
            text => Some(parse_duration("upstream.release_idle_after", text, "5s")?),
        },
        lanes,
        server_name,
        address,
        cluster,
    })
}

/// Lanes per key at most.
const MAX_LANES: usize = 64;

/// Lanes per key when not configured: one per runtime worker.
fn default_lanes() -> usize {
    default_workers()
}

/// Runtime worker threads when TOKIO_WORKER_THREADS is not set: one per two
/// cores, one to four.
pub fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).clamp(1, 4)
}

fn validate_limits(raw: RawLimits) -> Result<LimitsConfig, ConfigError> {
    let defaults = Limits::default();
    Ok(LimitsConfig {
        resp: Limits {
            max_bulk_bytes: positive(
                "limits.max_bulk_bytes",
                raw.max_bulk_bytes,
                defaults.max_bulk_bytes,
            )?,
            max_request_bytes: positive(
                "limits.max_request_bytes",
                raw.max_request_bytes,
                defaults.max_request_bytes,
            )?,
            max_array_len: positive(
                "limits.max_array_len",
                raw.max_array_len,
                defaults.max_array_len,
            )?,
            max_inline_bytes: positive(
                "limits.max_inline_bytes",
                raw.max_inline_bytes,
                defaults.max_inline_bytes,
            )?,
            max_reply_depth: positive(
                "limits.max_reply_depth",
                raw.max_reply_depth,
                defaults.max_reply_depth,
            )?,
            max_reply_bytes: positive(
                "limits.max_reply_bytes",
                raw.max_reply_bytes,
                defaults.max_reply_bytes,
            )?,
            unauthenticated: false,
        },
        max_pending_requests: positive(
            "limits.max_pending_requests",
            raw.max_pending_requests,
            1024,
        )?,
        client_write_timeout: parse_duration(
            "limits.client_write_timeout",
            raw.client_write_timeout.as_deref(),
            "30s",
        )?,
        request_read_timeout: parse_duration(
            "limits.request_read_timeout",
            raw.request_read_timeout.as_deref(),
            "30s",
        )?,
        max_buffered_bytes: positive(
            "limits.max_buffered_bytes",
            raw.max_buffered_bytes,
            1024 * 1024 * 1024,
        )?,
    })
}

fn validate_encryption(
    raw: Option<RawEncryption>,
    base: &Path,
) -> Result<EncryptionConfig, ConfigError> {
    let raw = raw.ok_or_else(|| {
        invalid(
            "encryption",
            "required: redcloak encrypts values. Make a key with `redcloak keygen`, then set \
             [encryption] primary = 1 and [[encryption.keys]] id = 1, file = \"...\"",
        )
    })?;
    let kms = validate_kms(&raw, base)?;
    let mut keys = Vec::with_capacity(raw.keys.len());
    let mut weak_key_ids = Vec::new();
    for key in raw.keys {
        let text = match (key.file, key.env) {
            (Some(path), None) => {
                let path = resolve(base, path);
                Zeroizing::new(
                    std::fs::read(&path).map_err(|source| ConfigError::ReadSecret {
                        key: "encryption.keys.file",
                        path,
                        source,
                    })?,
                )
            }
            (None, Some(variable)) => Zeroizing::new(
                std::env::var(&variable)
                    .map_err(|_| {
                        invalid(
                            "encryption.keys.env",
                            format!("key {}: variable {variable} is not set", key.id),
                        )
                    })?
                    .into_bytes(),
            ),
            _ => {
                return Err(invalid(
                    "encryption.keys",
                    format!("key {}: set exactly one of file or env", key.id),
                ));
            }
        };
        let decoded = keyring::decode_key(key.id, &text)
            .map_err(|e| invalid("encryption.keys", e.to_string()))?;
        if decoded.iter().all(|b| *b == decoded[0]) {
            weak_key_ids.push(key.id);
        }
        keys.push((key.id, decoded));
    }
    let legacy = match raw.legacy_plaintext {
        RawLegacy::Reject => LegacyPlaintext::Reject,
        RawLegacy::Pass => LegacyPlaintext::Pass,
    };
    let active = kms.as_ref().and_then(|kms| kms.file.active());
    let primary = match (raw.primary, active) {
        (Some(primary), Some(active)) if primary != active => {
            return Err(invalid(
                "encryption.primary",
                format!(
                    "is {primary}, but key {active} is active in encryption.keyring_file: \
                     leave primary out (the keyring file's active key seals)"
                ),
            ));
        }
        (Some(primary), _) | (None, Some(primary)) => Some(primary),
        // Serving needs one (`KeySources::keyring` says so); `keys new`
        // and `keys promote` make it.
        (None, None) if kms.is_some() => None,
        (None, None) => {
            return Err(invalid(
                "encryption.primary",
                "required: the id of the key that seals (or an active key in encryption.keyring_file)",
            ));
        }
    };
    // An id may be both raw and in the keyring file while a raw key moves
    // under a KMS (`keys import`, `keys rewrap`): the two must then be the
    // same key, which `KeySources::keyring` checks once it is unwrapped.
    let loaded = kms.iter().flat_map(|kms| {
        kms.file
            .keys
            .iter()
            .filter(|d| d.state.loaded())
            .map(|d| d.id)
    });
    if let Some(primary) = primary
        && !keys
            .iter()
            .map(|(id, _)| *id)
            .chain(loaded)
            .any(|id| id == primary)
    {
        return Err(invalid(
            "encryption",
            KeyError::NoPrimary(primary).to_string(),
        ));
    }
    let keys = KeySources {
        primary,
        raw: keys,
        legacy,
        kms: kms.map(Arc::new),
    };
    let rules = raw
        .rules
        .into_iter()
        .map(rule)
        .collect::<Result<Vec<_>, _>>()?;
    let unknown_commands = match raw.unknown_commands {
        RawUnknown::Refuse => UnknownCommands::Refuse,
        RawUnknown::Pass => UnknownCommands::Pass,
    };
    Ok(EncryptionConfig {
        keys,
        rules,
        unknown_commands,
        weak_key_ids,
    })
}

/// Every configured file that holds a secret.
fn secret_files(raw: &RawConfig, base: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut files = Vec::new();
    let mut add = |setting: &'static str, path: Option<&PathBuf>| {
        if let Some(path) = path {
            files.push((setting, resolve(base, path.clone())));
        }
    };
    add("upstream.key", raw.upstream.key.as_ref());
    add(
        "upstream.password_file",
        raw.upstream.password_file.as_ref(),
    );
    let sentinel = raw.upstream.sentinel.as_ref();
    add(
        "upstream.sentinel.key",
        sentinel.and_then(|s| s.key.as_ref()),
    );
    add(
        "upstream.sentinel.password_file",
        sentinel.and_then(|s| s.password_file.as_ref()),
    );
    add("listen.tls.key", raw.listen.tls.as_ref().map(|t| &t.key));
    add(
        "listen.auth.password_file",
        raw.listen
            .auth
            .as_ref()
            .and_then(|a| a.password_file.as_ref()),
    );
    for key in raw.encryption.iter().flat_map(|e| &e.keys) {
        add("encryption.keys.file", key.file.as_ref());
    }
    add("audit.key_file", raw.audit.as_ref().map(|a| &a.key_file));
    for provider in raw.encryption.iter().flat_map(|e| e.kms.values()) {
        match provider {
            RawKms::VaultTransit { token_file, .. } => {
                add("encryption.kms.token_file", Some(token_file))
            }
            RawKms::Pkcs11 { pin_file, .. } => add("encryption.kms.pin_file", Some(pin_file)),
            RawKms::AwsKms { .. } => {}
        }
    }
    files
}

/// The keyring file and its providers (`None` without a keyring file).
fn validate_kms(raw: &RawEncryption, base: &Path) -> Result<Option<Kms>, ConfigError> {
    let Some(path) = &raw.keyring_file else {
        if !raw.kms.is_empty() {
            return Err(invalid(
                "encryption.kms",
                "providers are configured but encryption.keyring_file is not set",
            ));
        }
        return Ok(None);
    };
    let path = resolve(base, path.clone());
    let text = std::fs::read_to_string(&path).map_err(|e| {
        invalid(
            "encryption.keyring_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let names: Vec<&str> = raw.kms.keys().map(String::as_str).collect();
    let file = KeyringFile::parse(&path, &text, &names)
        .map_err(|e| invalid("encryption.keyring_file", e.to_string()))?;
    let policy = raw.kms_policy.as_ref();
    let text = |get: fn(&RawKmsPolicy) -> &Option<String>| policy.and_then(|p| get(p).as_deref());
    let request_timeout = parse_duration(
        "encryption.kms_policy.request_timeout",
        text(|p| &p.request_timeout),
        "10s",
    )?;
    let mut providers = BTreeMap::new();
    for (name, provider) in &raw.kms {
        let settings = match provider {
            RawKms::VaultTransit {
                address,
                ca,
                token_file,
                mount,
                key,
            } => ProviderSettings::VaultTransit(TransitSettings {
                address: address.clone(),
                ca: ca.clone().map(|ca| resolve(base, ca)),
                token_file: resolve(base, token_file.clone()),
                mount: mount.clone(),
                key: key.clone(),
                request_timeout,
            }),
            RawKms::AwsKms {
                key_id,
                region,
                endpoint,
            } => ProviderSettings::Aws(AwsSettings {
                key_id: key_id.clone(),
                region: region.clone(),
                endpoint: endpoint.clone(),
                request_timeout,
            }),
            RawKms::Pkcs11 {
                module,
                token_label,
                pin_file,
                key_label,
            } => ProviderSettings::Pkcs11(Pkcs11Settings {
                module: module.clone(),
                token_label: token_label.clone(),
                pin_file: resolve(base, pin_file.clone()),
                key_label: key_label.clone(),
            }),
        };
        let provider = Provider::new(settings)
            .map_err(|why| invalid("encryption.kms", format!("{name}: {why}")))?;
        providers.insert(name.clone(), provider);
    }
    let policy = KmsPolicy {
        request_timeout,
        startup_timeout: parse_duration(
            "encryption.kms_policy.startup_timeout",
            text(|p| &p.startup_timeout),
            "30s",
        )?,
        revalidate_every: match parse_duration(
            "encryption.kms_policy.revalidate_every",
            text(|p| &p.revalidate_every),
            "15m",
        )? {
            zero if zero.is_zero() => {
                return Err(invalid(
                    "encryption.kms_policy.revalidate_every",
                    "must be greater than 0",
                ));
            }
            every => every,
        },
        max_unreachable: match text(|p| &p.max_unreachable).map(str::trim) {
            None | Some("off") => None,
            Some(bound) => Some(parse_duration(
                "encryption.kms_policy.max_unreachable",
                Some(bound),
                "off",
            )?),
        },
    };
    Ok(Some(Kms {
        file_path: path,
        file,
        providers,
        policy,
    }))
}

/// The non-empty lines of a secret, each a secret of its own.
fn one_per_line(secret: Secret) -> Vec<Secret> {
    secret
        .expose()
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty())
        .map(|line| Secret::new(line.to_vec()))
        .collect()
}

/// A secret from exactly one of `<key>` (or its environment variable) and `<key>_file`.
fn read_secret(
    key: &'static str,
    inline: Option<RawSecret>,
    file: Option<PathBuf>,
    base: &Path,
) -> Result<Secret, ConfigError> {
    let secret = match (inline, file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                key,
                "set either the password or password_file, not both",
            ));
        }
        (None, None) => {
            return Err(invalid(
                key,
                "required: set password_file (or the password, preferably through the environment)",
            ));
        }
        (Some(RawSecret(value)), None) => Secret::new(value.as_bytes().to_vec()),
        (None, Some(path)) => {
            let path = resolve(base, path);
            let mut bytes = std::fs::read(&path).map_err(|source| ConfigError::ReadSecret {
                key,
                path,
                source,
            })?;
            // A trailing newline from `echo` or an editor is not part of the secret.
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            Secret::new(bytes)
        }
    };
    if secret.is_empty() {
        return Err(invalid(key, "is empty"));
    }
    Ok(secret)
}

fn resolve(base: &Path, path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

fn parse_address(key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| invalid(key, format!("'{text}' is not an IP:port address")))
}

fn host_part(address: &str) -> Option<&str> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

fn parse_mode(text: Option<&str>) -> Result<u32, ConfigError> {
    // The environment's text arrives verbatim, quotes included if given.
    let text = text.unwrap_or("0660").trim_matches('"');
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| {
            invalid(
                "listen.unix_socket_mode",
                format!("'{text}' is not an octal file mode like \"0660\""),
            )
        })
}

fn positive(key: &'static str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(invalid(key, "must be greater than 0")),
        n => Ok(n),
    }
}

/// `"250ms"`, `"5s"`, `"2m"`, `"1h"`.
fn parse_duration(
    key: &'static str,
    text: Option<&str>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let text = text.unwrap_or(default).trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| invalid(key, format!("'{text}' is not a duration like \"5s\"")))?;
    let duration = match unit.trim() {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        _ => {
            return Err(invalid(
                key,
                format!("'{text}' has no unit: use ms, s, m or h"),
            ));
        }
    };
    if duration.is_zero() {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(duration)
}

// figment::Jail closures return figment::Error, which is large.
/// One `[[encryption.rules]]` entry, checked.
fn rule(raw: RawRule) -> Result<Rule, ConfigError> {
    let bind = match (raw.bind, raw.bind_key) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "encryption.rules",
                format!(
                    "rule '{}': give bind or bind_key, not both (bind_key is the older spelling)",
                    raw.pattern
                ),
            ));
        }
        (Some(RawBind::Key), None) | (None, Some(true)) => Some(Bind::Key),
        (Some(RawBind::Rule), None) => Some(Bind::Rule),
        (Some(RawBind::None), None) | (None, Some(false)) => Some(Bind::None),
        (None, None) => None,
    };
    let mode = match (raw.mode, bind) {
        (RawMode::Plaintext, Some(_)) => {
            return Err(invalid(
                "encryption.rules",
                format!("rule '{}': bind applies to encrypt rules only", raw.pattern),
            ));
        }
        (RawMode::Plaintext, None) => Mode::Plaintext,
        (RawMode::Encrypt, bind) => Mode::Encrypt {
            bind: bind.unwrap_or(Bind::Key),
        },
    };
    let members = match (mode, raw.members) {
        (Mode::Plaintext, Some(_)) => {
            return Err(invalid(
                "encryption.rules",
                format!(
                    "rule '{}': members applies to encrypt rules only",
                    raw.pattern
                ),
            ));
        }
        (_, Some(RawMembers::Deterministic)) => Members::Deterministic,
        (_, Some(RawMembers::Random) | None) => Members::Random,
    };
    Ok(Rule {
        name: raw.name.unwrap_or_else(|| raw.pattern.clone()).into(),
        pattern: raw.pattern,
        mode,
        members,
    })
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    const MINIMAL: &str = r#"
        [listen]
        address = "127.0.0.1:6380"
        [upstream]
        address = "redis.internal:6379"
        ca = "certs/ca.crt"
        cert = "certs/client.crt"
        key = "/abs/client.key"
        password_file = "secrets/redis-password"
        [encryption]
        primary = 1
        [[encryption.keys]]
        id = 1
        file = "secrets/key-1"
    "#;

    fn load_in_jail(jail: &mut Jail, toml: &str) -> Result<Config, ConfigError> {
        std::fs::create_dir_all(jail.directory().join("secrets")).expect("mkdir");
        jail.create_file("secrets/redis-password", "from-file-password\n")
            .expect("write");
        jail.create_file(
            "secrets/key-1",
            "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n",
        )
        .expect("write");
        jail.create_file("redcloak.toml", toml).expect("write");
        load(&jail.directory().join("redcloak.toml"))
    }

    fn error_text(result: Result<Config, ConfigError>) -> String {
        match result {
            Ok(_) => panic!("expected an error"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn loads_defaults_and_resolves_paths_against_the_config_folder() {
        Jail::expect_with(|jail| {
            let config = load_in_jail(jail, MINIMAL).expect("valid");
            assert_eq!(config.upstream.server_name, "redis.internal");
            assert_eq!(config.upstream.ca, jail.directory().join("certs/ca.crt"));
            assert_eq!(config.upstream.key, PathBuf::from("/abs/client.key"));
            assert_eq!(config.upstream.password.expose(), b"from-file-password");
            assert_eq!(config.upstream.connect_timeout, Duration::from_secs(5));
            assert_eq!(config.listen.max_connections, 10_000);
            assert_eq!(config.limits.resp, Limits::default());
            Ok(())
        });
    }

    #[test]
    fn the_unix_socket_mode_may_come_from_the_environment_unquoted() {
        Jail::expect_with(|jail| {
            let toml = MINIMAL.replace("[listen]", "[listen]\nunix_socket = \"/tmp/r.sock\"");
            jail.set_env("REDCLOAK_LISTEN__UNIX_SOCKET_MODE", "0600");
            let config = load_in_jail(jail, &toml).expect("valid");
            assert_eq!(config.listen.unix.expect("unix").mode, 0o600);
            jail.set_env("REDCLOAK_LISTEN__UNIX_SOCKET_MODE", "\"0640\"");
            let config = load_in_jail(jail, &toml).expect("quoted too");
            assert_eq!(config.listen.unix.expect("unix").mode, 0o640);
            Ok(())
        });
    }

    #[test]
    fn secrets_written_in_the_file_itself_are_refused() {
        Jail::expect_with(|jail| {
            let inline = MINIMAL.replace(
                "password_file = \"secrets/redis-password\"",
                "password = \"written-in-the-file\"",
            );
            let text = error_text(load_in_jail(jail, &inline));
            assert!(
                text.contains(
                    "upstream.password: a secret written in the configuration file is not accepted"
                ) && text.contains("REDCLOAK_UPSTREAM__PASSWORD")
                    && !text.contains("written-in-the-file"),
                "{text}"
            );
            let auth = format!("{MINIMAL}\n[listen.auth]\npassword = \"client-secret\"\n");
            let text = error_text(load_in_jail(jail, &auth));
            assert!(text.contains("listen.auth.password_file"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_errors() {
        Jail::expect_with(|jail| {
            let text = error_text(load_in_jail(
                jail,
                &format!("{MINIMAL}\nconect_timeout = \"1s\"\n"),
            ));
            assert!(text.contains("conect_timeout"), "{text}");
            jail.set_env("REDCLOAK_UPSTREAM__TYPO", "x");
            let text = error_text(load_in_jail(jail, MINIMAL));
            assert!(text.contains("typo"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_the_file_and_secrets_stay_verbatim() {
        Jail::expect_with(|jail| {
            jail.set_env("REDCLOAK_UPSTREAM__ADDRESS", "10.0.0.5:6390");
            let toml = MINIMAL.replace("password_file = \"secrets/redis-password\"", "");
            jail.set_env("REDCLOAK_UPSTREAM__PASSWORD", "007");
            let config = load_in_jail(jail, &toml).expect("valid");
            assert_eq!(config.upstream.address, "10.0.0.5:6390");
            assert_eq!(config.upstream.server_name, "10.0.0.5");
            assert_eq!(config.upstream.password.expose(), b"007");
            Ok(())
        });
    }

    #[test]
    fn the_upstream_cannot_be_configured_without_tls_identity_or_password() {
        Jail::expect_with(|jail| {
            for (line, key) in [
                ("ca = \"certs/ca.crt\"", "upstream.ca"),
                ("cert = \"certs/client.crt\"", "upstream.cert"),
                (
                    "password_file = \"secrets/redis-password\"",
                    "upstream.password",
                ),
            ] {
                let text = error_text(load_in_jail(jail, &MINIMAL.replace(line, "")));
                assert!(text.starts_with(key), "{text}");
            }
            Ok(())
        });
    }

    #[test]
    fn the_reload_watch_polls_every_10s_unless_set_or_off() {
        Jail::expect_with(|jail| {
            let config = load_in_jail(jail, MINIMAL).expect("valid");
            assert_eq!(config.reload_watch_interval, Some(Duration::from_secs(10)));
            let every =
                |value: &str| format!("{MINIMAL}\n[reload]\nwatch_interval = \"{value}\"\n");
            let config = load_in_jail(jail, &every("250ms")).expect("valid");
            assert_eq!(
                config.reload_watch_interval,
                Some(Duration::from_millis(250))
            );
            let config = load_in_jail(jail, &every("off")).expect("valid");
            assert_eq!(config.reload_watch_interval, None);
            let zero = error_text(load_in_jail(jail, &every("0s")));
            assert!(zero.starts_with("reload.watch_interval"), "{zero}");
            Ok(())
        });
    }

    #[test]
    fn remote_plaintext_listeners_need_an_explicit_opt_in() {
        Jail::expect_with(|jail| {
            let remote = MINIMAL.replace("127.0.0.1:6380", "0.0.0.0:6380");
            assert!(error_text(load_in_jail(jail, &remote)).starts_with("listen.address"));
            let allowed = remote.replace("[listen]", "[listen]\nallow_remote_plaintext = true");
            assert!(load_in_jail(jail, &allowed).is_ok());
            Ok(())
        });
    }

    #[test]
    fn errors_never_quote_a_secret() {
        Jail::expect_with(|jail| {
            let toml = MINIMAL.replace(
                "password_file = \"secrets/redis-password\"",
                "password = 98765432123",
            );
            let text = error_text(load_in_jail(jail, &toml));
            assert!(!text.contains("98765432123"), "{text}");
            assert!(text.contains("password"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn encryption_is_required_and_validated() {
        Jail::expect_with(|jail| {
            let without = MINIMAL
                .split("[encryption]")
                .next()
                .expect("head")
                .to_owned();
            assert!(error_text(load_in_jail(jail, &without)).starts_with("encryption: required"));
            let wrong_primary = MINIMAL.replace("primary = 1", "primary = 2");
            assert!(error_text(load_in_jail(jail, &wrong_primary)).contains("primary key id 2"));
            let short = MINIMAL.replace("file = \"secrets/key-1\"", "env = \"REDCLOAK_KEY_SHORT\"");
            jail.set_env("REDCLOAK_KEY_SHORT", "c2hvcnQ=");
            let text = error_text(load_in_jail(jail, &short));
            assert!(
                text.contains("base64 of 32 bytes") && !text.contains("c2hvcnQ"),
                "{text}"
            );
            jail.set_env(
                "REDCLOAK_KEY_SHORT",
                "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
            );
            let config = load_in_jail(jail, &short).expect("key from the environment");
            assert_eq!(config.encryption.keys.primary, Some(1));
            let rules = format!(
                "{MINIMAL}\n[[encryption.rules]]\npattern = \"rl:*\"\nmode = \"plaintext\"\n\
                [[encryption.rules]]\npattern = \"s:*\"\nmode = \"encrypt\"\nbind_key = false\n"
            );
            let config = load_in_jail(jail, &rules).expect("rules");
            assert_eq!(config.encryption.rules[0].mode, Mode::Plaintext);
            assert_eq!(
                config.encryption.rules[1].mode,
                Mode::Encrypt { bind: Bind::None }
            );
            assert_eq!(&*config.encryption.rules[1].name, "s:*");
            let by_rule = format!(
                "{MINIMAL}\n[[encryption.rules]]\nname = \"queues\"\npattern = \"q:*\"\nmode = \"encrypt\"\nbind = \"rule\"\n"
            );
            let config = load_in_jail(jail, &by_rule).expect("a rule-bound rule");
            assert_eq!(
                config.encryption.rules[0].mode,
                Mode::Encrypt { bind: Bind::Rule }
            );
            assert_eq!(&*config.encryption.rules[0].name, "queues");
            assert_eq!(config.encryption.rules[0].members, Members::Random);
            let deterministic = by_rule.replace(
                "bind = \"rule\"",
                "bind = \"rule\"\nmembers = \"deterministic\"",
            );
            let config = load_in_jail(jail, &deterministic).expect("deterministic list elements");
            assert_eq!(config.encryption.rules[0].members, Members::Deterministic);
            let both = by_rule.replace("bind = \"rule\"", "bind = \"rule\"\nbind_key = true");
            assert!(error_text(load_in_jail(jail, &both)).contains("not both"));
            let plain_bound = rules.replace(
                "mode = \"plaintext\"",
                "mode = \"plaintext\"\nbind = \"key\"",
            );
            assert!(error_text(load_in_jail(jail, &plain_bound)).contains("encrypt rules only"));
            let script = format!(
                "{MINIMAL}\n[[scripts]]\nname = \"pop\"\nbody = \"return redis.call('LPOP', KEYS[1])\"\n\
                 keys = [\"list\"]\nreply = \"KEYS[1]\"\n"
            );
            load_in_jail(jail, &script).expect("a proved script entry");
            let sneaky = script.replace("KEYS[1])", "'other')");
            let text = error_text(load_in_jail(jail, &sneaky));
            assert!(
                text.contains("script 'pop': its body is not proved"),
                "{text}"
            );
            let bad_mode = rules.replace("mode = \"plaintext\"", "mode = \"clear\"");
            assert!(error_text(load_in_jail(jail, &bad_mode)).contains("clear"));
            Ok(())
        });
    }

    #[test]
    fn the_example_config_is_valid() {
        Jail::expect_with(|jail| {
            jail.set_env("REDCLOAK_UPSTREAM__PASSWORD", "example-upstream-password");
            jail.set_env("REDCLOAK_LISTEN__AUTH__PASSWORD", "example-client-password");
            jail.set_env(
                "REDCLOAK_KEY_1",
                "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
            );
            let example =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("config/redcloak.example.toml");
            let config = load(&example).expect("the example loads");
            assert_eq!(config.upstream.username.as_deref(), Some("redcloak"));
            let auth = config.listen.auth.expect("listen.auth");
            assert_eq!(auth.lockout, LockoutPolicy::default());
            assert_eq!(
                config.metrics_address,
                Some("127.0.0.1:9187".parse().expect("address"))
            );
            assert!(!config.log_key_names);
            Ok(())
        });
    }

    #[test]
    fn lockout_metrics_and_logging_keys_are_read_and_validated() {
        Jail::expect_with(|jail| {
            let base = MINIMAL;
            jail.set_env("REDCLOAK_LISTEN__AUTH__PASSWORD", "p");
            let extra = "[listen.auth]\nmax_failures = 3\nfailure_window = \"2m\"\n\
                         lockout_duration = \"10s\"\n[metrics]\naddress = \"0.0.0.0:9187\"\n\
                         [logging]\nlog_key_names = true\n";
            let config = load_in_jail(jail, &format!("{base}{extra}")).expect("valid");
            assert_eq!(
                config.listen.auth.expect("auth").lockout,
                LockoutPolicy {
                    max_failures: 3,
                    global_max_failures: 100,
                    window: Duration::from_secs(120),
                    duration: Duration::from_secs(10),
                }
            );
            assert_eq!(config.metrics_address.map(|a| a.port()), Some(9187));
            assert!(config.log_key_names);
            let zero = extra.replace("max_failures = 3", "max_failures = 0");
            assert!(
                error_text(load_in_jail(jail, &format!("{base}{zero}")))
                    .starts_with("listen.auth.max_failures: must be greater than 0")
            );
            // The environment sets them like any other key.
            jail.set_env("REDCLOAK_METRICS__ADDRESS", "127.0.0.1:9999");
            jail.set_env("REDCLOAK_LISTEN__AUTH__MAX_FAILURES", "7");
            let config = load_in_jail(jail, &format!("{base}{extra}")).expect("valid");
            assert_eq!(config.metrics_address.map(|a| a.port()), Some(9999));
            assert_eq!(config.listen.auth.expect("auth").lockout.max_failures, 7);
            jail.clear_env();
            let bad = "[metrics]\naddress = \"nowhere\"\n";
            assert!(
                error_text(load_in_jail(jail, &format!("{base}{bad}")))
                    .starts_with("metrics.address")
            );
            Ok(())
        });
    }

    #[test]
    fn parses_durations_and_modes() {
        assert_eq!(
            parse_duration("k", Some("250ms"), "1s").expect("ms"),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("k", Some("2m"), "1s").expect("m"),
            Duration::from_secs(120)
        );
        assert!(parse_duration("k", Some("5"), "1s").is_err());
        assert!(parse_duration("k", Some("0s"), "1s").is_err());
        assert_eq!(parse_mode(Some("0600")).expect("mode"), 0o600);
        assert!(parse_mode(Some("0999")).is_err());
        assert_eq!(host_part("[::1]:6379"), Some("::1"));
    }
}
