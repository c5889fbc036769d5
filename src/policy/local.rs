//! What a client on a shared lane is answered by redcloak itself, and the
//! connection state redcloak keeps for it meanwhile: the handshakes that
//! clients send on connecting (HELLO, CLIENT SETNAME, GETNAME, SETINFO,
//! SELECT) must not cost them a connection of their own. CLIENT
//! MAINT_NOTIFICATIONS is answered as Redis 7 does: redcloak relays no
//! maintenance pushes. CLIENT SETINFO goes to Redis on the lane (Redis
//! before 7.2 refuses it; either way it only labels the connection). CLIENT
//! ID is not answered here: clients pass the id to CLIENT TRACKING REDIRECT
//! and CLIENT KILL ID, which need Redis's own, so it moves the client to a
//! connection of its own. The state kept here is replayed on the connection
//! a client moves to when it is pinned ([`replay`]), so Redis then knows
//! what the client told redcloak.
//!
//! Only the exact grammar is answered here; anything else (a wrong argument
//! count, another subcommand) goes to Redis on the client's own connection,
//! which answers it as Redis does.

use super::Action;
use crate::resp;
use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicU64, Ordering};

/// A client's connection state as redcloak keeps it on lanes.
#[derive(Debug, Default, Clone)]
pub struct LocalState {
    /// redcloak's own id for the client, as HELLO reports it.
    pub id: u64,
    /// HELLO 3 was answered: the client speaks RESP3 (its lanes do too).
    pub resp3: bool,
    pub name: Option<Bytes>,
    pub lib_name: Option<Bytes>,
    pub lib_version: Option<Bytes>,
    /// The database selected (SELECT moves the client to its lanes).
    pub database: u32,
}

/// redcloak's client ids, for HELLO on lanes.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl LocalState {
    /// A new client's state, with its own id.
    pub fn new() -> LocalState {
        LocalState {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            ..LocalState::default()
        }
    }

    /// 2 or 3.
    pub fn protocol(&self) -> u8 {
        if self.resp3 { 3 } else { 2 }
    }

    /// Whether Redis needs to be told anything when the client moves to a
    /// connection of its own.
    pub fn is_default(&self) -> bool {
        !self.resp3
            && self.name.is_none()
            && self.lib_name.is_none()
            && self.lib_version.is_none()
            && self.database == 0
    }
}

/// The answer to a request that redcloak gives for a client on a lane, or
/// `None` when the request is not one of those.
pub fn answer(args: &[Bytes], state: &mut LocalState) -> Option<Action> {
    let [command, subcommand, rest @ ..] = args else {
        return None;
    };
    if !command.eq_ignore_ascii_case(b"client") {
        return None;
    }
    let sub = subcommand.to_ascii_lowercase();
    match (sub.as_slice(), rest) {
        (b"getname", []) => {
            let mut out = BytesMut::new();
            match &state.name {
                Some(name) => resp::encode_bulk(&mut out, name),
                None => out.extend_from_slice(b"$-1\r\n"),
            }
            Some(Action::Answer(out.freeze()))
        }
        (b"setname", [name]) => Some(if !valid_attribute(name) {
            Action::AnswerError(
                "ERR Client names cannot contain spaces, newlines or special characters.".into(),
            )
        } else {
            // An empty name removes the name, as in Redis.
            state.name = (!name.is_empty()).then(|| name.clone());
            Action::AnswerOk
        }),
        // Maintenance notifications (Redis 8) would push frames on the
        // connection; redcloak follows its upstream itself and relays none,
        // so it answers as a Redis without them does (redis-py carries on).
        (b"maint_notifications", _) => Some(Action::AnswerError(format!(
            "ERR unknown subcommand '{}'. Try CLIENT HELP.",
            super::shown(subcommand)
        ))),
        (b"setinfo", [attribute, value]) => {
            let attribute = attribute.to_ascii_lowercase();
            let slot = match attribute.as_slice() {
                b"lib-name" => &mut state.lib_name,
                b"lib-ver" => &mut state.lib_version,
                _ => return None,
            };
            // Redis 7.2 answers +OK, older ones an unknown subcommand:
            // Redis answers, on the lane (it only labels the connection), and
            // the attribute is kept for the client's own connection.
            if valid_attribute(value) {
                *slot = (!value.is_empty()).then(|| value.clone());
            }
            Some(Action::Forward(super::ReplyPlan::Passthrough))
        }
        _ => None,
    }
}

/// The database a `SELECT` on a lane asks for, when its argument is a
/// plain decimal index (anything else goes to Redis, which answers it).
pub fn select(args: &[Bytes]) -> Option<u32> {
    let [command, index] = args else {
        return None;
    };
    if !command.eq_ignore_ascii_case(b"select")
        || index.is_empty()
        || index.len() > 9
        || (index.len() > 1 && index[0] == b'0')
        || !index.iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    std::str::from_utf8(index).ok()?.parse().ok()
}

/// The HELLO reply for a client on a lane: Redis's own reply to HELLO in
/// that protocol (server, version, mode, role, modules), with the client's
/// id in place of the lane's. `None` when `server` is not a HELLO reply.
pub fn hello_reply(server: &[u8], id: u64) -> Option<Bytes> {
    let (header, elements) = resp::aggregate_elements(server, &resp::Limits::default())?;
    if elements.len() % 2 != 0 {
        return None;
    }
    let mut out = BytesMut::with_capacity(server.len() + 16);
    out.extend_from_slice(header);
    for pair in elements.chunks(2) {
        out.extend_from_slice(pair[0]);
        if resp::bulk_body(pair[0]) == Some(b"id") {
            out.extend_from_slice(format!(":{id}\r\n").as_bytes());
        } else {
            out.extend_from_slice(pair[1]);
        }
    }
    Some(out.freeze())
}

/// The name a HELLO ... SETNAME name sets (the arguments as forwarded).
pub fn hello_name(args: &[Bytes]) -> Option<&Bytes> {
    args.windows(2)
        .skip(2)
        .find(|pair| pair[0].eq_ignore_ascii_case(b"setname"))
        .map(|pair| &pair[1])
}

/// Redis's rule for names and library attributes: printable ASCII, no spaces.
fn valid_attribute(value: &[u8]) -> bool {
    value.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

/// The commands that tell Redis a client's state kept on lanes, for the
/// connection it moves to. Each must succeed, except SETINFO, which Redis
/// before 7.2 does not know (the clients that send it ignore that error too).
pub fn replay(state: &LocalState) -> Vec<(Vec<Bytes>, bool)> {
    let mut commands = Vec::new();
    let command = |args: &[&[u8]]| args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
    if state.resp3 {
        commands.push((command(&[b"HELLO", b"3"]), true));
    }
    if state.database != 0 {
        let database = state.database.to_string();
        commands.push((command(&[b"SELECT", database.as_bytes()]), true));
    }
    if let Some(name) = &state.name {
        commands.push((command(&[b"CLIENT", b"SETNAME", name]), true));
    }
    if let Some(lib) = &state.lib_name {
        commands.push((command(&[b"CLIENT", b"SETINFO", b"LIB-NAME", lib]), false));
    }
    if let Some(version) = &state.lib_version {
        commands.push((
            command(&[b"CLIENT", b"SETINFO", b"LIB-VER", version]),
            false,
        ));
    }
    commands
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(parts: &[&str]) -> Vec<Bytes> {
        parts
            .iter()
            .map(|p| Bytes::copy_from_slice(p.as_bytes()))
            .collect()
    }

    fn reply(action: Option<Action>) -> Vec<u8> {
        match action {
            Some(Action::Answer(bytes)) => bytes.to_vec(),
            Some(Action::AnswerOk) => b"+OK\r\n".to_vec(),
            Some(Action::AnswerError(text)) => format!("-{text}\r\n").into_bytes(),
            Some(Action::Forward(super::super::ReplyPlan::Passthrough)) => b"forwarded".to_vec(),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_connect_handshakes_are_answered_and_remembered() {
        let mut state = LocalState::default();
        let mut ask = |parts: &[&str]| reply(answer(&args(parts), &mut state));
        assert_eq!(ask(&["client", "getname"]), b"$-1\r\n");
        assert_eq!(ask(&["CLIENT", "SETNAME", "worker-1"]), b"+OK\r\n");
        assert_eq!(ask(&["CLIENT", "GETNAME"]), b"$8\r\nworker-1\r\n");
        assert_eq!(
            ask(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"]),
            b"forwarded"
        );
        assert_eq!(
            ask(&["CLIENT", "SETINFO", "lib-ver", "8.0.0"]),
            b"forwarded"
        );
        assert_eq!(ask(&["CLIENT", "SETINFO", "LIB-VER", "a b"]), b"forwarded");
        assert!(ask(&["CLIENT", "SETNAME", "two words"]).starts_with(b"-ERR Client names"));
        assert_eq!(ask(&["CLIENT", "SETNAME", ""]), b"+OK\r\n");
        assert_eq!(
            ask(&[
                "CLIENT",
                "MAINT_NOTIFICATIONS",
                "ON",
                "moving-endpoint-type",
                "internal-ip"
            ]),
            b"-ERR unknown subcommand 'MAINT_NOTIFICATIONS'. Try CLIENT HELP.\r\n"
        );
        assert_eq!(state.name, None);
        assert_eq!(state.lib_name.as_deref(), Some(&b"redis-py"[..]));
        assert_eq!(state.lib_version.as_deref(), Some(&b"8.0.0"[..]));
        let replayed = replay(&state);
        assert_eq!(replayed.len(), 2);
        assert_eq!(
            replayed[0].0,
            args(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"])
        );
        assert!(!replayed[0].1);
    }

    #[test]
    fn select_is_answered_for_plain_indexes_only() {
        assert_eq!(select(&args(&["SELECT", "0"])), Some(0));
        assert_eq!(select(&args(&["select", "15"])), Some(15));
        for odd in [
            &["SELECT", "01"][..],
            &["SELECT", "-1"],
            &["SELECT", "+1"],
            &["SELECT", "x"],
            &["SELECT", ""],
            &["SELECT", "1234567890"],
            &["SELECT", "1", "2"],
            &["SELECT"],
        ] {
            assert_eq!(select(&args(odd)), None, "{odd:?}");
        }
        let state = LocalState {
            database: 3,
            ..LocalState::default()
        };
        assert!(!state.is_default());
        assert_eq!(replay(&state)[0].0, args(&["SELECT", "3"]));
    }

    #[test]
    fn other_forms_go_to_redis() {
        let mut state = LocalState::default();
        for parts in [
            &["CLIENT", "LIST"][..],
            &["CLIENT", "ID"],
            &["CLIENT", "SETNAME"],
            &["CLIENT", "SETINFO", "LIB-COLOR", "red"],
            &["CLIENT", "TRACKING", "on"],
            &["GET", "k"],
            &["CLIENT"],
        ] {
            assert!(answer(&args(parts), &mut state).is_none(), "{parts:?}");
        }
    }
}
