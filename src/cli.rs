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
}
