//! The one table of Redis commands the proxy treats specially.
//!
//! One row per command, sorted by lower-case name (a test checks it). A row
//! says how the proxy handles the command; the reasons for refusals live here
//! and nowhere else. Commands without a row are forwarded unchanged for now:
//! value encryption (a later change) turns that default into a refusal and
//! gives every command Redis lists its own row.

/// Which family of pub/sub subscriptions a command acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubSubKind {
    Channel,
    Pattern,
    Shard,
}

/// How the proxy handles one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Answered by the proxy; never forwarded.
    Auth,
    Hello,
    Quit,
    /// Forwarded, then the proxy logs the upstream connection in again.
    Reset,
    /// Forwarded unless the subcommand is refused (CLIENT REPLY OFF|SKIP).
    Client,
    Multi,
    Exec,
    Discard,
    Subscribe(PubSubKind),
    Unsubscribe(PubSubKind),
    /// Never forwarded; the text says why and what to do instead.
    Refuse(&'static str),
}

pub struct Row {
    pub name: &'static str,
    pub handling: Handling,
}

const REPLICATION: &str =
    "replication commands are not proxied; connect replicas to Redis directly";

pub static COMMANDS: &[Row] = &[
    Row {
        name: "auth",
        handling: Handling::Auth,
    },
    Row {
        name: "client",
        handling: Handling::Client,
    },
    Row {
        name: "discard",
        handling: Handling::Discard,
    },
    Row {
        name: "exec",
        handling: Handling::Exec,
    },
    Row {
        name: "hello",
        handling: Handling::Hello,
    },
    Row {
        name: "monitor",
        handling: Handling::Refuse(
            "MONITOR is not proxied: its stream does not fit the request/reply pipeline; \
             run it against Redis directly with an admin account",
        ),
    },
    Row {
        name: "multi",
        handling: Handling::Multi,
    },
    Row {
        name: "psubscribe",
        handling: Handling::Subscribe(PubSubKind::Pattern),
    },
    Row {
        name: "psync",
        handling: Handling::Refuse(REPLICATION),
    },
    Row {
        name: "punsubscribe",
        handling: Handling::Unsubscribe(PubSubKind::Pattern),
    },
    Row {
        name: "quit",
        handling: Handling::Quit,
    },
    Row {
        name: "replconf",
        handling: Handling::Refuse(REPLICATION),
    },
    Row {
        name: "reset",
        handling: Handling::Reset,
    },
    Row {
        name: "ssubscribe",
        handling: Handling::Subscribe(PubSubKind::Shard),
    },
    Row {
        name: "subscribe",
        handling: Handling::Subscribe(PubSubKind::Channel),
    },
    Row {
        name: "sunsubscribe",
        handling: Handling::Unsubscribe(PubSubKind::Shard),
    },
    Row {
        name: "sync",
        handling: Handling::Refuse(REPLICATION),
    },
    Row {
        name: "unsubscribe",
        handling: Handling::Unsubscribe(PubSubKind::Channel),
    },
];

/// The row for a command name, matched case-insensitively.
pub fn lookup(name: &[u8]) -> Option<&'static Row> {
    let mut lower = [0u8; 32];
    let lower = lower.get_mut(..name.len())?;
    for (to, from) in lower.iter_mut().zip(name) {
        *to = from.to_ascii_lowercase();
    }
    COMMANDS
        .binary_search_by(|row| row.name.as_bytes().cmp(lower))
        .ok()
        .map(|i| &COMMANDS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_sorted_and_unique_for_binary_search() {
        for pair in COMMANDS.windows(2) {
            assert!(
                pair[0].name < pair[1].name,
                "{} before {}",
                pair[0].name,
                pair[1].name
            );
        }
        for row in COMMANDS {
            assert_eq!(row.name, row.name.to_ascii_lowercase());
        }
    }

    #[test]
    fn lookup_ignores_case_and_rejects_unknown_names() {
        assert_eq!(lookup(b"AuTh").map(|r| r.name), Some("auth"));
        assert!(lookup(b"get").is_none());
        assert!(lookup(&[b'a'; 40]).is_none());
        assert!(lookup(b"").is_none());
    }
}
