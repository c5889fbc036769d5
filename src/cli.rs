//! Command line (clap). The doc comments here are the `--help` text.

use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

/// redcloak: a Redis security sidecar.
///
/// Applications connect to redcloak as if it were Redis. redcloak forwards
/// every command to the real Redis over mutual TLS, logged in with AUTH;
/// there is no plaintext or unauthenticated path to Redis.
#[derive(Debug, Parser)]
#[command(
    name = "redcloak",
    version,
    after_help = "Logging: set RUST_LOG (e.g. RUST_LOG=redcloak=debug). Logs never contain values, passwords or keys.\n\
                  Exit codes: 0 ok, 1 runtime failure, 64 usage error, 78 configuration error."
)]
pub struct Cli {
    /// Log line format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Say whether a data key can be retired: counts what Redis holds
    /// (as `rekey --dry-run`) and exits 0 only when no value is sealed
    /// under it, stream entries included (rekey never rewrites those: trim
    /// them), and it is not the primary. It changes nothing: remove the
    /// key's [[encryption.keys]] entry yourself.
    Retire {
        /// Path of the config file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The key id to retire.
        #[arg(long, value_name = "ID")]
        id: u32,
    },
    /// Make a data key from the OS's random generator, wrap it with the KMS
    /// provider NAME and add it to encryption.keyring_file as `pending`
    /// (it opens values, never seals). Reload every proxy, then promote it.
    New {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The provider under [encryption.kms.NAME].
        #[arg(long, value_name = "NAME")]
        kms: String,
        /// The id (the next free one by default).
        #[arg(long, value_name = "ID")]
        id: Option<u32>,
    },
    /// Make key ID the active one (the primary) once it unwraps and
    /// checks; the active one becomes decrypt-only. Then reload.
    Promote {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_name = "ID")]
        id: u32,
    },
    /// Every key: id, state, provider (or raw), whether it unwrapped and
    /// matched its check value, and (from a running proxy's admin listener,
    /// when metrics.address is set) how many values it sealed and opened.
    List {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: ReportFormat,
    },
    /// Unwrap every key of the keyring file and check it; exit 0 only when
    /// all pass.
    Verify {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Move a raw key (base64, as `redcloak keygen` prints it) under the
    /// KMS provider NAME as key ID, decrypt-only. Then remove its
    /// [[encryption.keys]] entry (and, if it was the primary, `primary`,
    /// and run `keys promote --id ID`) and reload.
    Import {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_name = "ID")]
        id: u32,
        /// The file holding the raw key.
        #[arg(long, value_name = "FILE")]
        from_file: PathBuf,
        #[arg(long, value_name = "NAME")]
        kms: String,
    },
    /// KEK rotation: unwrap every key and wrap it again with the provider
    /// NAME (each checked), then write the keyring file atomically.
    Rewrap {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_name = "NAME")]
        to_kms: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check an audit log's chain (every MAC, every entry in order, each
    /// segment linked to the one before): exit 0 when whole, 1 naming the
    /// first bad entry.
    Verify {
        /// The audit key ([audit] key_file).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// A checkpoint from the normal log (`SEGMENT:SEQ:MAC`, from an
        /// "audit checkpoint" line) the log must still hold: a log cut
        /// short after it fails.
        #[arg(long, value_name = "SEGMENT:SEQ:MAC")]
        checkpoint: Vec<String>,
        /// The audit files, oldest first (rotated ones `FILE.<time>`, then
        /// FILE).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write a development CA, a certificate for Redis (with --hosts as its
    /// names), a client certificate for redcloak's upstream side and a
    /// server certificate for redcloak's TLS listener into DIR (keys mode
    /// 0600), then print the redis.conf and redcloak config lines that use
    /// them. Existing files are never replaced without --force.
    Dev {
        /// The folder to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Names and addresses in Redis's certificate; the first is the host
        /// redcloak connects to.
        #[arg(
            long,
            value_name = "NAMES",
            value_delimiter = ',',
            default_value = "localhost,127.0.0.1"
        )]
        hosts: Vec<String>,
        /// Names and addresses in the certificate of redcloak's TLS listener.
        #[arg(
            long,
            value_name = "NAMES",
            value_delimiter = ',',
            default_value = "localhost,127.0.0.1"
        )]
        proxy_hosts: Vec<String>,
        /// Replace existing files.
        #[arg(long, conflicts_with = "if_missing")]
        force: bool,
        /// Write nothing, successfully, when every file is already there
        /// (for one-shot containers that run on each start).
        #[arg(long)]
        if_missing: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy with a config file (TOML; REDCLOAK_* environment
    /// variables override it, `__` nests: REDCLOAK_UPSTREAM__ADDRESS).
    ///
    /// Before listening it runs the startup security checks (see `check`)
    /// and exits 78 with the report when one fails.
    ///
    /// With [metrics] address, an admin listener serves /metrics
    /// (Prometheus), /healthz and /readyz (200 once the checks passed and
    /// while Redis is reachable; 503 before, and from shutdown on).
    /// Security events are logged on the target redcloak::security.
    ///
    /// Stops on SIGTERM or SIGINT: listeners close, requests in flight finish
    /// within shutdown.grace_period, then it exits 0.
    Serve {
        /// Path of the config file. Relative paths inside it resolve against its folder.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Try redcloak on this machine: make throwaway certificates, start a
    /// TLS-only redis-server (client certificates required, random password)
    /// and serve in front of it. Ctrl-C stops both and removes the files.
    Dev {
        /// Where redcloak listens for plaintext clients (loopback only).
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:6380")]
        listen: SocketAddr,
        /// Where /metrics, /healthz and /readyz are served.
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:9187")]
        metrics: SocketAddr,
    },
    /// Certificates for development and tests (production certificates
    /// come from your own CA).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Data keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print a new random password (32 random bytes, hex: 64 characters),
    /// for Redis's ACL user or [listen.auth].
    Password,
    /// Ask redcloak's admin listener whether it is ready: exit 0 when the
    /// URL answers 200, 1 otherwise (a container HEALTHCHECK; the image has
    /// no shell or curl).
    Health {
        /// The URL to ask (http only).
        #[arg(
            long,
            value_name = "URL",
            default_value = "http://127.0.0.1:9187/readyz"
        )]
        url: String,
        /// How long to wait for the answer, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 3)]
        timeout: u64,
    },
    /// Run the startup security checks against the configured Redis without
    /// serving, print the report, and exit 0 when every required check
    /// passes, 78 otherwise. `serve` runs the same checks before it listens.
    Check {
        /// Path of the config file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Report format: `text` for people, `json` for pipelines.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
    },
    /// Print a new random 256-bit encryption key (base64) on stdout, and on
    /// stderr how to add it to [[encryption.keys]].
    Keygen,
    /// Re-encrypt what Redis holds under one key (the primary unless
    /// --to-key), so an old key can be retired. Uses the config's rules,
    /// keyring and upstream TLS and login, and connects to Redis directly.
    /// Each value is rewritten with a compare-and-swap that keeps its TTL; a
    /// value the app changes meanwhile is read again (3 times at most). A
    /// value that does not open is counted and never rewritten. Strings,
    /// hashes, lists, sets and sorted sets; stream entries are counted, never
    /// rewritten (Redis never changes an entry: trim them). Shows a progress
    /// bar on a terminal, JSON lines on stderr otherwise. Prints a JSON
    /// census (values per key id) and the command that reverses the run.
    Rekey {
        /// Path of the config file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Seal under this key id instead of the primary (a rollback); it
        /// must be in the keyring.
        #[arg(long, value_name = "ID")]
        to_key: Option<u32>,
        /// Also seal plaintext values left from before encryption.
        #[arg(long)]
        seal_legacy: bool,
        /// Write every value back in plaintext: the way off redcloak (Redis
        /// then holds readable values). Needs --i-understand.
        #[arg(long, conflicts_with_all = ["to_key", "seal_legacy"], requires = "i_understand")]
        to_plaintext: bool,
        /// Confirms --to-plaintext.
        #[arg(long)]
        i_understand: bool,
        /// Only keys matching this glob (Redis's SCAN MATCH).
        #[arg(long = "match", value_name = "GLOB")]
        pattern: Option<String>,
        /// Count only: print the census, rewrite nothing.
        #[arg(long)]
        dry_run: bool,
        /// Count only, and exit 0 only when nothing remains under another
        /// key (1 otherwise): run it before removing a key.
        #[arg(long, conflicts_with = "dry_run")]
        verify: bool,
        /// Values larger than this many bytes are reported, not rewritten.
        #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024 * 1024)]
        max_value_bytes: usize,
        /// Record progress in this file (written atomically every 2 s); an
        /// unfinished run recorded there is resumed, and one recorded with
        /// another keyring or other options is refused.
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
        /// At most this many values rewritten per second.
        #[arg(long, value_name = "VALUES")]
        rate: Option<u32>,
        /// At most this many bytes written per second.
        #[arg(long, value_name = "BYTES")]
        rate_bytes: Option<u64>,
        /// Halve the rate while a page's compare-and-swap round trip takes
        /// longer than this many milliseconds (raised again by a tenth
        /// after pages under half of it, up to --rate).
        #[arg(long, value_name = "MS")]
        max_latency: Option<u64>,
        /// Stop after this many keys (resume with the same --checkpoint).
        #[arg(long, value_name = "KEYS")]
        stop_after: Option<u64>,
    },
}
