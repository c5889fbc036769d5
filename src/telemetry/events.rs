//! Security events: one structured log line per event, on the tracing target
//! `redcloak::security` (JSON with `--log-format json`), so they can be
//! routed and alerted on apart from the rest of the logs.
//!
//! | event                      | fields                                        |
//! |----------------------------|-----------------------------------------------|
//! | `client_auth_failure`      | peer                                          |
//! | `client_auth_lockout`      | peer, failures, lockout_seconds               |
//! | `command_refused`          | peer, command, rule                           |
//! | `decrypt_failure`          | peer, command, key_id, reason, key (opt-in)   |
//! | `upstream_rejected`        | upstream, step, error                         |
//! | `cross_protocol`           | peer                                          |
//! | `kms_unreachable`          | provider, key_id, error                       |
//! | `key_revoked`              | provider, key_id, error                       |
//! | `key_restored`             | provider, key_id                              |
//! | `keyring_changed`          | keys (each id: old state -> new state)        |
//!
//! Never a value, a password or key material. Key names only when
//! `[logging] log_key_names = true`; command names only from the command
//! table (an unknown name is `other`).

use crate::telemetry::metrics::{OpenFailure, UpstreamFailure};
use std::fmt::Display;
use tracing::warn;

/// The tracing target of every security event.
pub const TARGET: &str = "redcloak::security";

pub fn client_auth_failure(peer: &dyn Display) {
    warn!(target: TARGET, event = "client_auth_failure", peer = %peer, "client AUTH failed");
}

pub fn client_auth_lockout(peer: &dyn Display, failures: u32, lockout_seconds: u64) {
    warn!(
        target: TARGET,
        event = "client_auth_lockout",
        peer = %peer,
        failures,
        lockout_seconds,
        "too many failed AUTH attempts: peer locked out"
    );
}

pub fn command_refused(peer: &dyn Display, command: &str, rule: &str) {
    warn!(
        target: TARGET,
        event = "command_refused",
        peer = %peer,
        command,
        rule,
        "command refused"
    );
}

/// `key`: the key name, only when the operator asked for key names in logs.
pub fn decrypt_failure(
    peer: &dyn Display,
    command: &str,
    key_id: Option<u32>,
    reason: OpenFailure,
    key: Option<&str>,
) {
    warn!(
        target: TARGET,
        event = "decrypt_failure",
        peer = %peer,
        command,
        key_id,
        reason = reason.label(),
        key,
        "a value from Redis failed to decrypt"
    );
}

/// A pub/sub message whose payload failed to open: dropped, not delivered.
/// `channel`: only when the operator asked for key names in logs.
pub fn message_dropped(
    peer: &dyn Display,
    key_id: Option<u32>,
    reason: OpenFailure,
    channel: Option<&str>,
) {
    warn!(
        target: TARGET,
        event = "message_dropped",
        peer = %peer,
        key_id,
        reason = reason.label(),
        channel,
        "a pub/sub message failed to decrypt and was dropped"
    );
}

/// Redis failed verification at `step` (its certificate, or AUTH): `error`
/// says why, and holds no secret.
pub fn upstream_rejected(upstream: &str, step: UpstreamFailure, error: &dyn Display) {
    warn!(
        target: TARGET,
        event = "upstream_rejected",
        upstream,
        step = step.label(),
        error = %error,
        "upstream verification failed"
    );
}

/// A client sent `POST` or `Host:` as a command: an HTTP request aimed at the
/// RESP port (a browser tricked into it, or a scan). Closed, as Redis does.
/// A KMS did not answer a revalidation (serving goes on from memory).
pub fn kms_unreachable(provider: &str, key_id: u32, error: &dyn Display) {
    warn!(
        target: TARGET,
        event = "kms_unreachable",
        provider,
        key_id,
        error = %error,
        "KMS unreachable: serving goes on with the keys in memory"
    );
}

/// A KMS denied a data key while running: it is dropped.
pub fn key_revoked(provider: &str, key_id: u32, error: &dyn Display) {
    tracing::error!(
        target: TARGET,
        event = "key_revoked",
        provider,
        key_id,
        error = %error,
        "the KMS denied a data key: it is dropped, its values fail to open"
    );
}

/// A reload applied key operations (`redcloak keys new`, `promote`,
/// `retire`, ...): each key's state before and after.
pub fn keyring_changed(keys: &[String]) {
    warn!(
        target: TARGET,
        event = "keyring_changed",
        keys = %keys.join("; "),
        "the keyring changed"
    );
}

/// A KMS allows a revoked data key again: it is back.
pub fn key_restored(provider: &str, key_id: u32) {
    warn!(
        target: TARGET,
        event = "key_restored",
        provider,
        key_id,
        "the KMS allows a revoked data key again: it is restored"
    );
}

pub fn cross_protocol(peer: &dyn Display) {
    warn!(
        target: TARGET,
        event = "cross_protocol",
        peer = %peer,
        "possible cross-protocol attack: an HTTP request on the RESP port; connection closed"
    );
}

/// A reload ran (`trigger`: signal, endpoint or watch): what it published,
/// what it rejected and why (texts that hold no secret), and the changed
/// settings that wait for a restart. Every reload is a security event.
pub fn reload(trigger: &str, changed: &[String], rejected: &[String], restart_required: &[String]) {
    let changed = changed.join(", ");
    let restart_required = restart_required.join(", ");
    if rejected.is_empty() {
        warn!(
            target: TARGET,
            event = "reload",
            trigger,
            changed,
            restart_required,
            "reloaded"
        );
    } else {
        let rejected = rejected.join("; ");
        warn!(
            target: TARGET,
            event = "reload_rejected",
            trigger,
            changed,
            rejected,
            restart_required,
            "reload rejected some material; the old material stays in use"
        );
    }
}
