//! The one table of Redis commands: every command Redis 7.0 lists in
//! `COMMAND`, one row each, sorted by lower-case name (tests check both).
//!
//! A row holds every per-command fact the proxy uses: its class (what the
//! proxy may do, with the refusal text where it refuses), where its keys
//! are, which arguments are stored values and which parts of its reply to
//! open ([`Sealed`]), whether it blocks and for how long, whether it moves
//! values between its keys, and what it leaves on the connection. Commands
//! without a row are refused unless `encryption.unknown_commands = "pass"`,
//! because forwarding a command we do not understand could store a value in
//! the clear. `docs/commands.md` is generated from this table.

pub use crate::crypto::envelope::Kind;
use bytes::Bytes;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

/// Which family of pub/sub subscriptions a command acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubSubKind {
    Channel,
    Pattern,
    Shard,
}

/// Commands that act on the connection rather than on stored data.
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
}

/// Commands that run, load or manage server-side Lua.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scripting {
    /// EVAL, EVAL_RO: the body comes with the call.
    Eval,
    /// EVALSHA, EVALSHA_RO: a body redcloak must have seen and proved.
    EvalSha,
    /// FCALL, FCALL_RO: a function whose library redcloak loaded and proved.
    FCall,
    /// SCRIPT <subcommand>: see [`SCRIPT_SUBCOMMANDS`].
    Script,
    /// FUNCTION <subcommand>: see [`FUNCTION_SUBCOMMANDS`].
    Function,
}

/// What the proxy does with a SCRIPT or FUNCTION subcommand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subcommand {
    Forward,
    /// SCRIPT LOAD, FUNCTION LOAD: forwarded once the body is proved.
    Load,
    /// Would run or restore code redcloak has not proved: forwarded only
    /// when no key is encrypted.
    OnlyAllPlaintext,
    Refuse(&'static str),
}

const SCRIPT_DEBUG: &str = "SCRIPT DEBUG is not proxied: the Lua debugger takes over the connection; \
debug scripts against a development Redis directly";

#[rustfmt::skip]
pub static SCRIPT_SUBCOMMANDS: &[(&str, Subcommand)] = &[
    ("debug", Subcommand::Refuse(SCRIPT_DEBUG)),
    ("exists", Subcommand::Forward),
    ("flush", Subcommand::OnlyAllPlaintext),
    ("help", Subcommand::Forward),
    ("kill", Subcommand::Forward),
    ("load", Subcommand::Load),
];

#[rustfmt::skip]
pub static FUNCTION_SUBCOMMANDS: &[(&str, Subcommand)] = &[
    ("delete", Subcommand::Forward),
    ("dump", Subcommand::Forward),
    ("flush", Subcommand::OnlyAllPlaintext),
    ("help", Subcommand::Forward),
    ("kill", Subcommand::Forward),
    ("list", Subcommand::Forward),
    ("load", Subcommand::Load),
    ("restore", Subcommand::OnlyAllPlaintext),
    ("stats", Subcommand::Forward),
];

/// A subcommand's entry (any case); `None`: unknown, refused.
pub fn subcommand(table: &[(&str, Subcommand)], name: &[u8]) -> Option<Subcommand> {
    table
        .iter()
        .find(|(known, _)| known.as_bytes().eq_ignore_ascii_case(name))
        .map(|(_, what)| *what)
}

/// What the proxy may do with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Connection(Handling),
    /// No stored value crosses: forwarded whatever its keys' rules (key
    /// space, TTLs, hash field names, lengths and counts, server commands).
    Forward,
    /// Values are sealed on the way in and opened on the way out.
    Sealed(Sealed),
    /// Redis must read or compute on the value: forwarded only when every
    /// key's rule is plaintext.
    ServerReadsValue,
    /// Redis orders members by their bytes (the BYLEX family): the order of
    /// envelopes means nothing, so forwarded only when every key's rule is
    /// plaintext.
    OrdersValues,
    /// SORT: a collection; BY and GET make Redis read other keys' values.
    Sort,
    /// Lua scripts and functions: run only when `policy::script` proves
    /// they touch no key but the ones they declare.
    Scripting(Scripting),
    Refuse(&'static str),
}

/// A command whose arguments or reply hold stored values: what kind of
/// value, where they are in the arguments, and which parts of the reply
/// to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    pub kind: Kind,
    pub values: Values,
    pub opens: Opens,
    /// Redis compares the values sent with stored ones (LREM, LPOS,
    /// LINSERT): they must be sealed deterministically, which set and
    /// sorted-set members always are and list elements are on rules with
    /// `members = "deterministic"`.
    pub equality: bool,
}

/// Where a command's values are among its arguments (0 is the name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    None,
    /// The argument at this index: SET's value, LSET's element, PUBLISH's message.
    At(u8),
    /// Every argument from this index on: LPUSH's elements.
    From(u8),
    /// MSET: key, value, key, value, ...
    KeyValuePairs,
    /// HSET: field, value pairs from argument 2, each value bound to its field.
    FieldValuePairs,
    /// ZADD: options (NX, XX, GT, LT, CH, INCR), then score, member pairs.
    ScoreMemberPairs,
    /// XADD: options (NOMKSTREAM, MAXLEN/MINID [=|~] n, LIMIT n), the id,
    /// then field, value pairs, each value bound to its field.
    StreamFields,
    /// `count` arguments from `first` on: GEODIST's two members.
    Span {
        first: u8,
        count: u8,
    },
    /// GEOADD: options (NX, XX, CH), then longitude, latitude, member triples.
    GeoTriples,
    /// The argument after this option word: GEOSEARCH's FROMMEMBER member.
    AfterWord(&'static str),
}

/// Whether a reply of members carries their scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scores {
    Never,
    Always,
    /// With WITHSCORES among the options, which start this many arguments
    /// after the last key (ZRANGE's start and stop: 2).
    WithOption(u8),
}

/// Which parts of a reply are stored values to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opens {
    Nothing,
    /// One value (or nil) of the first key: GET, LINDEX, LMOVE.
    Value,
    /// SET: the old value, when GET is among the options.
    ValueWithGet,
    /// HGET: the value of the field in argument 2.
    FieldValue,
    /// One value or an array (or RESP3 set) of values of the first key:
    /// LPOP and RPOP with or without a count, LRANGE.
    Values,
    /// MGET: one value per key argument.
    PerKey,
    /// HMGET: one value per field argument.
    PerField,
    /// HGETALL: field/value pairs.
    HashPairs,
    /// HRANDFIELD: field/value pairs with WITHVALUES, else field names only.
    HashPairsWithValues,
    /// HVALS: sent as HGETALL, delivered as the values alone.
    HashValues,
    /// HSCAN: `[cursor, pairs]`, unless NOVALUES.
    HashScan,
    /// BLPOP, BRPOP: `[key, value]`, the key one of the arguments.
    KeyAndValue,
    /// LMPOP, BLMPOP: `[key, [values]]`.
    KeyAndValues,
    /// Set and sorted-set members: one, or an array or set of them, or
    /// member/score pairs (flat in RESP2, nested in RESP3).
    Members(Scores),
    /// BZPOPMIN, BZPOPMAX: `[key, member, score]`.
    KeyMemberScore,
    /// ZMPOP, BZMPOP: `[key, [[member, score], ...]]`.
    KeyAndMembersWithScores,
    /// SSCAN, ZSCAN: `[cursor, members]`. MATCH is applied by redcloak
    /// after opening, as Redis would have applied it after reading.
    Scan(Scores),
    /// Stream entries `[[id, [field, value, ...]], ...]` (XRANGE; XCLAIM
    /// unless JUSTID, whose options start at this argument).
    StreamEntries {
        options_from: u8,
    },
    /// XREAD, XREADGROUP: `[[key, entries], ...]`, a RESP3 map, or nil.
    Streams,
    /// XAUTOCLAIM: `[cursor, entries, deleted ids]`, unless JUSTID.
    AutoClaim,
    /// XINFO STREAM: its first-entry, last-entry and (FULL) entries.
    StreamInfo,
    /// GEORADIUS, GEOSEARCH: members, or `[member, distance?, hash?,
    /// coordinates?]` arrays with the WITH options; an integer with STORE.
    GeoResults,
}

/// Why a command that needs plaintext keys is refused on `key`, whose rule
/// `rule` describes: the text after `ERR redcloak: `, saying what to do.
pub fn plaintext_only(row: &Row, key: &str, rule: &str) -> String {
    let name = row.name.to_ascii_uppercase();
    match row.class {
        Class::ServerReadsValue => format!(
            "{name} needs Redis to read the value of '{key}', which is encrypted ({rule}). \
             To use {name} on such keys, give them a plaintext rule ([[encryption.rules]] mode = \"plaintext\")"
        ),
        Class::OrdersValues => format!(
            "{name} on '{key}' is refused: it ranges over members by their bytes, and '{key}' is \
             encrypted ({rule}), so the order Redis sees means nothing. Give such keys a plaintext rule \
             to use {name}"
        ),
        Class::Scripting(_) => {
            let framework = PLAINTEXT_FRAMEWORKS
                .iter()
                .find(|(prefix, _)| key.starts_with(prefix))
                .map_or(String::new(), |(_, why)| format!(" {why}"));
            format!(
                "{name} needs Redis to read and write the values of '{key}', which is encrypted ({rule}). \
                 Scripts run only on keys with a plaintext rule ([[encryption.rules]] mode = \"plaintext\"), \
                 unless they are known scripts (docs/envelope.md).{framework}"
            )
        }
        _ => format!("{name} on '{key}' is refused: '{key}' is encrypted ({rule})"),
    }
}

/// Frameworks whose Lua scripts build or parse payloads, by the prefix of
/// their keys: no proxy can encrypt what Lua must read.
const PLAINTEXT_FRAMEWORKS: &[(&str, &str)] = &[
    (
        "bull:",
        "BullMQ builds and parses its job payloads inside Lua, so no proxy can encrypt them: \
         give its keys a plaintext rule (pattern = \"bull:*\", mode = \"plaintext\")",
    ),
    (
        "queues:",
        "Laravel's queue builds and parses its job payloads inside Lua, so no proxy can encrypt them: \
         give its keys a plaintext rule (pattern = \"queues:*\", mode = \"plaintext\")",
    ),
];

/// Where a command's keys are (argument 0 is the command name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    None,
    /// Like COMMAND's first/last/step; a negative `last` counts from the end.
    Range {
        first: u8,
        last: i8,
        step: u8,
    },
    /// A key count at `at`, then that many keys; `dest`: argument 1 is a key too.
    NumKeys {
        at: u8,
        dest: bool,
    },
    /// XREAD / XREADGROUP: after STREAMS, the first half of the arguments.
    Streams,
    /// SORT: argument 1, and the argument after the last STORE, read as
    /// Redis's `sortGetKeys` reads them (LIMIT takes two arguments, GET and
    /// BY one).
    SortStore,
    /// GEORADIUS(BYMEMBER): argument 1, then the argument after the first
    /// STORE and the first STOREDIST from `options_from` on, as Redis 7's
    /// key specs find them.
    GeoStore {
        options_from: u8,
    },
}

pub struct Row {
    pub name: &'static str,
    pub class: Class,
    pub keys: Keys,
    /// Where its timeout is, if it may keep Redis from answering.
    pub blocks: Option<Timeout>,
    /// Values move between its keys or are compared across them (LMOVE,
    /// RENAME, COPY, SMOVE, set algebra, ZUNIONSTORE): forwarded only when
    /// every key's rule shares the first key's binding.
    pub moves_values: bool,
    /// What it leaves on the upstream connection once answered.
    pub leaves: Leaves,
    /// Its reply grows with the data (a whole hash, set, list or range, a
    /// key listing): on lanes it is sent on the bulk lane, so it cannot
    /// stall small replies behind it.
    pub bulky: bool,
    /// How it goes in front of a Redis Cluster.
    pub cluster: InCluster,
}

/// How a command goes in front of a Redis Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InCluster {
    /// To the primary of its keys' slot (a keyless one to any primary).
    BySlot,
    /// It sets up the connection: every node connection hears it (HELLO;
    /// CLIENT's SETNAME and SETINFO).
    Setup,
    /// MULTI, EXEC, DISCARD, WATCH, UNWATCH: the transaction is pinned to
    /// the primary of its keys' slot.
    Transaction,
    /// Sent to every primary, the replies combined into one.
    EveryPrimary(Combine),
    /// (P|S)SUBSCRIBE and (P|S)UNSUBSCRIBE: held on a subscriber
    /// connection (channels and patterns on any node, shard channels on
    /// their slot's primary).
    PubSub,
    /// RESET: every node connection of the client starts over.
    Reset,
    /// SCAN: every primary in turn, the cursor naming the shard.
    Scan,
    /// By slot; keys across slots split per slot when
    /// `cluster.split_multikey` is on, the replies combined.
    Split(Combine),
    /// Refused, for this reason: it needs every primary, or connection
    /// state one node cannot hold for the others.
    Refused(&'static str),
}

/// How the replies of every primary become one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Integers added (DBSIZE).
    Sum,
    /// All the same, or an error (SCRIPT LOAD, FUNCTION LOAD).
    Same,
    /// Each part's array elements put back in the request's key order
    /// (MGET).
    KeyOrder,
}

/// Transactions run on the primary of their keys' slot.
const CLUSTER_TRANSACTIONS: InCluster = InCluster::Transaction;
/// Keys counted per slot and the counts added (DEL, UNLINK, EXISTS, TOUCH).
const CLUSTER_SPLIT_COUNT: InCluster = InCluster::Split(Combine::Sum);
/// The client sees one Redis: the cluster's layout is redcloak's to use,
/// and changing it is an operator's job against the nodes (CLUSTER KEYSLOT
/// alone is answered: it only hashes a name).
const CLUSTER_TOPOLOGY: InCluster = InCluster::Refused(
    "redcloak serves the Redis Cluster as one Redis; CLUSTER subcommands other than KEYSLOT are not served (use a cluster-unaware client; change the cluster against its nodes)",
);
/// Where a request goes is redcloak's choice, per slot.
const CLUSTER_ROUTING: InCluster = InCluster::Refused(
    "redcloak routes each request to its slot's primary itself; ASKING, READONLY and READWRITE are not served in front of a Redis Cluster",
);
/// Subscriptions live on connections of their own.
const CLUSTER_PUBSUB: InCluster = InCluster::PubSub;
/// Commands about the whole keyspace or every node.
const CLUSTER_EVERY_PRIMARY: InCluster = InCluster::Refused(
    "this command needs every primary of the cluster and is not supported in front of a Redis Cluster yet",
);

/// A row for a command on data or the server.
const fn row(name: &'static str, class: Class, keys: Keys) -> Row {
    Row {
        name,
        class,
        keys,
        blocks: None,
        moves_values: false,
        leaves: Leaves::Nothing,
        bulky: false,
        cluster: InCluster::BySlot,
    }
}

/// A row for a command on the connection: it leaves the session changed.
const fn connection(name: &'static str, handling: Handling) -> Row {
    Row {
        leaves: Leaves::Session,
        ..row(name, Class::Connection(handling), Keys::None)
    }
}

impl Row {
    const fn blocks(self, timeout: Timeout) -> Row {
        Row {
            blocks: Some(timeout),
            ..self
        }
    }

    const fn moves_values(self) -> Row {
        Row {
            moves_values: true,
            ..self
        }
    }

    const fn leaves(self, leaves: Leaves) -> Row {
        Row { leaves, ..self }
    }

    const fn bulky(self) -> Row {
        Row {
            bulky: true,
            ..self
        }
    }

    const fn in_cluster(self, cluster: InCluster) -> Row {
        Row { cluster, ..self }
    }
}

const MONITOR: &str = "MONITOR is not proxied: its stream does not fit the request/reply pipeline; \
run it against Redis directly with an admin account";
const MIGRATE: &str = "MIGRATE is not proxied: Redis would send the stored value to another server \
over plaintext TCP and make connections anywhere; move data with redcloak in front of both sides";
const REPLICATION: &str =
    "replication commands are not proxied; connect replicas to Redis directly";

/// The common key layouts.
const NONE: Keys = Keys::None;
const K1: Keys = Keys::Range {
    first: 1,
    last: 1,
    step: 1,
};
const K2: Keys = Keys::Range {
    first: 2,
    last: 2,
    step: 1,
};
const K1_2: Keys = Keys::Range {
    first: 1,
    last: 2,
    step: 1,
};
const ALL: Keys = Keys::Range {
    first: 1,
    last: -1,
    step: 1,
};
const ALL_BUT_LAST: Keys = Keys::Range {
    first: 1,
    last: -2,
    step: 1,
};

const fn sealed(kind: Kind, values: Values, opens: Opens) -> Sealed {
    Sealed {
        kind,
        values,
        opens,
        equality: false,
    }
}

/// Sent values Redis compares with stored ones.
const fn compared(kind: Kind, values: Values) -> Sealed {
    Sealed {
        equality: true,
        ..sealed(kind, values, Opens::Nothing)
    }
}

const SET: Sealed = sealed(Kind::String, Values::At(2), Opens::ValueWithGet);
const SETNX: Sealed = sealed(Kind::String, Values::At(2), Opens::Nothing);
const SETEX: Sealed = sealed(Kind::String, Values::At(3), Opens::Nothing);
const GETSET: Sealed = sealed(Kind::String, Values::At(2), Opens::Value);
const GET: Sealed = sealed(Kind::String, Values::None, Opens::Value);
const MGET: Sealed = sealed(Kind::String, Values::None, Opens::PerKey);
const MSET: Sealed = sealed(Kind::String, Values::KeyValuePairs, Opens::Nothing);
const HSET: Sealed = sealed(Kind::HashField, Values::FieldValuePairs, Opens::Nothing);
const HGET: Sealed = sealed(Kind::HashField, Values::None, Opens::FieldValue);
const HMGET: Sealed = sealed(Kind::HashField, Values::None, Opens::PerField);
const HGETALL: Sealed = sealed(Kind::HashField, Values::None, Opens::HashPairs);
const HVALS: Sealed = sealed(Kind::HashField, Values::None, Opens::HashValues);
const HRANDFIELD: Sealed = sealed(Kind::HashField, Values::None, Opens::HashPairsWithValues);
const HSCAN: Sealed = sealed(Kind::HashField, Values::None, Opens::HashScan);
const LIST_PUSH: Sealed = sealed(Kind::ListElement, Values::From(2), Opens::Nothing);
const LIST_POP: Sealed = sealed(Kind::ListElement, Values::None, Opens::Values);
const LIST_ONE: Sealed = sealed(Kind::ListElement, Values::None, Opens::Value);
const LIST_SET: Sealed = sealed(Kind::ListElement, Values::At(3), Opens::Nothing);
const LIST_BLOCKING_POP: Sealed = sealed(Kind::ListElement, Values::None, Opens::KeyAndValue);
const LIST_MPOP: Sealed = sealed(Kind::ListElement, Values::None, Opens::KeyAndValues);
const PUBLISH: Sealed = sealed(Kind::Message, Values::At(2), Opens::Nothing);
const LIST_REM: Sealed = compared(Kind::ListElement, Values::At(3));
const LIST_POS: Sealed = compared(Kind::ListElement, Values::At(2));
const LIST_INSERT: Sealed = compared(Kind::ListElement, Values::From(3));
const SET_ADD: Sealed = sealed(Kind::SetMember, Values::From(2), Opens::Nothing);
const SET_IS: Sealed = sealed(Kind::SetMember, Values::At(2), Opens::Nothing);
const SET_MOVE: Sealed = sealed(Kind::SetMember, Values::At(3), Opens::Nothing);
const SET_READ: Sealed = sealed(Kind::SetMember, Values::None, Opens::Members(Scores::Never));
const SET_STORE: Sealed = sealed(Kind::SetMember, Values::None, Opens::Nothing);
const SET_SCAN: Sealed = sealed(Kind::SetMember, Values::None, Opens::Scan(Scores::Never));
const ZSET_ADD: Sealed = sealed(
    Kind::SortedSetMember,
    Values::ScoreMemberPairs,
    Opens::Nothing,
);
const ZSET_MEMBER: Sealed = sealed(Kind::SortedSetMember, Values::At(2), Opens::Nothing);
const ZSET_MEMBERS: Sealed = sealed(Kind::SortedSetMember, Values::From(2), Opens::Nothing);
const ZSET_INCR: Sealed = sealed(Kind::SortedSetMember, Values::At(3), Opens::Nothing);
const ZSET_RANGE: Sealed = sealed(
    Kind::SortedSetMember,
    Values::None,
    Opens::Members(Scores::WithOption(2)),
);
const ZSET_RANDOM: Sealed = sealed(
    Kind::SortedSetMember,
    Values::None,
    Opens::Members(Scores::WithOption(1)),
);
const ZSET_ALGEBRA: Sealed = sealed(
    Kind::SortedSetMember,
    Values::None,
    Opens::Members(Scores::WithOption(0)),
);
const ZSET_POP: Sealed = sealed(
    Kind::SortedSetMember,
    Values::None,
    Opens::Members(Scores::Always),
);
const ZSET_BLOCKING_POP: Sealed =
    sealed(Kind::SortedSetMember, Values::None, Opens::KeyMemberScore);
const ZSET_MPOP: Sealed = sealed(
    Kind::SortedSetMember,
    Values::None,
    Opens::KeyAndMembersWithScores,
);
const ZSET_STORE: Sealed = sealed(Kind::SortedSetMember, Values::None, Opens::Nothing);
const STREAM_ADD: Sealed = sealed(Kind::StreamValue, Values::StreamFields, Opens::Nothing);
const STREAM_RANGE: Sealed = sealed(
    Kind::StreamValue,
    Values::None,
    Opens::StreamEntries { options_from: 4 },
);
const STREAM_CLAIM: Sealed = sealed(
    Kind::StreamValue,
    Values::None,
    Opens::StreamEntries { options_from: 5 },
);
const STREAM_AUTOCLAIM: Sealed = sealed(Kind::StreamValue, Values::None, Opens::AutoClaim);
const STREAM_READ: Sealed = sealed(Kind::StreamValue, Values::None, Opens::Streams);
const STREAM_INFO: Sealed = sealed(Kind::StreamValue, Values::None, Opens::StreamInfo);
const GEO_ADD: Sealed = sealed(Kind::SortedSetMember, Values::GeoTriples, Opens::Nothing);
const GEO_DIST: Sealed = sealed(
    Kind::SortedSetMember,
    Values::Span { first: 2, count: 2 },
    Opens::Nothing,
);
const GEO_MEMBERS: Sealed = sealed(Kind::SortedSetMember, Values::From(2), Opens::Nothing);
const GEO_RADIUS: Sealed = sealed(Kind::SortedSetMember, Values::None, Opens::GeoResults);
const GEO_RADIUS_BY_MEMBER: Sealed =
    sealed(Kind::SortedSetMember, Values::At(2), Opens::GeoResults);
const GEO_SEARCH: Sealed = sealed(
    Kind::SortedSetMember,
    Values::AfterWord("frommember"),
    Opens::GeoResults,
);
const GEO_SEARCH_STORE: Sealed = sealed(
    Kind::SortedSetMember,
    Values::AfterWord("frommember"),
    Opens::Nothing,
);
const PFADD: Sealed = sealed(Kind::HyperLogLogElement, Values::From(2), Opens::Nothing);
const ZSET_SCAN: Sealed = sealed(
    Kind::SortedSetMember,
    Values::None,
    Opens::Scan(Scores::Always),
);

#[rustfmt::skip]
pub static COMMANDS: &[Row] = &[
    row("acl", Class::Forward, NONE),
    row("append", Class::ServerReadsValue, K1),
    row("asking", Class::Forward, NONE)
        .leaves(Leaves::Session)
        .in_cluster(CLUSTER_ROUTING),
    connection("auth", Handling::Auth),
    row("bgrewriteaof", Class::Forward, NONE),
    row("bgsave", Class::Forward, NONE),
    row("bitcount", Class::ServerReadsValue, K1),
    row("bitfield", Class::ServerReadsValue, K1),
    row("bitfield_ro", Class::ServerReadsValue, K1),
    row("bitop", Class::ServerReadsValue, Keys::Range { first: 2, last: -1, step: 1 }),
    row("bitpos", Class::ServerReadsValue, K1),
    row("blmove", Class::Sealed(LIST_ONE), K1_2).blocks(Timeout::LastSeconds).moves_values(),
    row("blmpop", Class::Sealed(LIST_MPOP), Keys::NumKeys { at: 2, dest: false }).blocks(Timeout::FirstSeconds),
    row("blpop", Class::Sealed(LIST_BLOCKING_POP), ALL_BUT_LAST).blocks(Timeout::LastSeconds),
    row("brpop", Class::Sealed(LIST_BLOCKING_POP), ALL_BUT_LAST).blocks(Timeout::LastSeconds),
    row("brpoplpush", Class::Sealed(LIST_ONE), K1_2).blocks(Timeout::LastSeconds).moves_values(),
    row("bzmpop", Class::Sealed(ZSET_MPOP), Keys::NumKeys { at: 2, dest: false }).blocks(Timeout::FirstSeconds),
    row("bzpopmax", Class::Sealed(ZSET_BLOCKING_POP), ALL_BUT_LAST).blocks(Timeout::LastSeconds),
    row("bzpopmin", Class::Sealed(ZSET_BLOCKING_POP), ALL_BUT_LAST).blocks(Timeout::LastSeconds),
    connection("client", Handling::Client).in_cluster(InCluster::Setup),
    row("cluster", Class::Forward, NONE).in_cluster(CLUSTER_TOPOLOGY),
    row("command", Class::Forward, NONE),
    row("config", Class::Forward, NONE),
    row("copy", Class::Forward, K1_2).moves_values(),
    row("dbsize", Class::Forward, NONE).in_cluster(InCluster::EveryPrimary(Combine::Sum)),
    row("debug", Class::Forward, NONE).leaves(Leaves::Session),
    row("decr", Class::ServerReadsValue, K1),
    row("decrby", Class::ServerReadsValue, K1),
    row("del", Class::Forward, ALL).in_cluster(CLUSTER_SPLIT_COUNT),
    connection("discard", Handling::Discard)
        .leaves(Leaves::Transaction)
        .in_cluster(CLUSTER_TRANSACTIONS),
    row("dump", Class::ServerReadsValue, K1),
    row("echo", Class::Forward, NONE),
    row("eval", Class::Scripting(Scripting::Eval), Keys::NumKeys { at: 2, dest: false }),
    row("eval_ro", Class::Scripting(Scripting::Eval), Keys::NumKeys { at: 2, dest: false }),
    row("evalsha", Class::Scripting(Scripting::EvalSha), Keys::NumKeys { at: 2, dest: false }),
    row("evalsha_ro", Class::Scripting(Scripting::EvalSha), Keys::NumKeys { at: 2, dest: false }),
    connection("exec", Handling::Exec)
        .leaves(Leaves::Transaction)
        .in_cluster(CLUSTER_TRANSACTIONS),
    row("exists", Class::Forward, ALL).in_cluster(CLUSTER_SPLIT_COUNT),
    row("expire", Class::Forward, K1),
    row("expireat", Class::Forward, K1),
    row("expiretime", Class::Forward, K1),
    row("failover", Class::Forward, NONE),
    row("fcall", Class::Scripting(Scripting::FCall), Keys::NumKeys { at: 2, dest: false }),
    row("fcall_ro", Class::Scripting(Scripting::FCall), Keys::NumKeys { at: 2, dest: false }),
    row("flushall", Class::Forward, NONE).in_cluster(CLUSTER_EVERY_PRIMARY),
    row("flushdb", Class::Forward, NONE).in_cluster(CLUSTER_EVERY_PRIMARY),
    row("function", Class::Scripting(Scripting::Function), NONE)
        .in_cluster(InCluster::EveryPrimary(Combine::Same)),
    row("geoadd", Class::Sealed(GEO_ADD), K1),
    row("geodist", Class::Sealed(GEO_DIST), K1),
    row("geohash", Class::Sealed(GEO_MEMBERS), K1),
    row("geopos", Class::Sealed(GEO_MEMBERS), K1),
    row("georadius", Class::Sealed(GEO_RADIUS), Keys::GeoStore { options_from: 6 }).moves_values(),
    row("georadius_ro", Class::Sealed(GEO_RADIUS), K1),
    row("georadiusbymember", Class::Sealed(GEO_RADIUS_BY_MEMBER), Keys::GeoStore { options_from: 5 }).moves_values(),
    row("georadiusbymember_ro", Class::Sealed(GEO_RADIUS_BY_MEMBER), K1),
    row("geosearch", Class::Sealed(GEO_SEARCH), K1),
    row("geosearchstore", Class::Sealed(GEO_SEARCH_STORE), K1_2).moves_values(),
    row("get", Class::Sealed(GET), K1),
    row("getbit", Class::ServerReadsValue, K1),
    row("getdel", Class::Sealed(GET), K1),
    row("getex", Class::Sealed(GET), K1),
    row("getrange", Class::ServerReadsValue, K1),
    row("getset", Class::Sealed(GETSET), K1),
    row("hdel", Class::Forward, K1),
    connection("hello", Handling::Hello).in_cluster(InCluster::Setup),
    row("hexists", Class::Forward, K1),
    row("hget", Class::Sealed(HGET), K1),
    row("hgetall", Class::Sealed(HGETALL), K1).bulky(),
    row("hincrby", Class::ServerReadsValue, K1),
    row("hincrbyfloat", Class::ServerReadsValue, K1),
    row("hkeys", Class::Forward, K1).bulky(),
    row("hlen", Class::Forward, K1),
    row("hmget", Class::Sealed(HMGET), K1),
    row("hmset", Class::Sealed(HSET), K1),
    row("hrandfield", Class::Sealed(HRANDFIELD), K1),
    row("hscan", Class::Sealed(HSCAN), K1),
    row("hset", Class::Sealed(HSET), K1),
    row("hsetnx", Class::Sealed(HSET), K1),
    row("hstrlen", Class::ServerReadsValue, K1),
    row("hvals", Class::Sealed(HVALS), K1).bulky(),
    row("incr", Class::ServerReadsValue, K1),
    row("incrby", Class::ServerReadsValue, K1),
    row("incrbyfloat", Class::ServerReadsValue, K1),
    row("info", Class::Forward, NONE),
    row("keys", Class::Forward, NONE)
        .bulky()
        .in_cluster(CLUSTER_EVERY_PRIMARY),
    row("lastsave", Class::Forward, NONE),
    row("latency", Class::Forward, NONE),
    row("lcs", Class::ServerReadsValue, K1_2),
    row("lindex", Class::Sealed(LIST_ONE), K1),
    row("linsert", Class::Sealed(LIST_INSERT), K1),
    row("llen", Class::Forward, K1),
    row("lmove", Class::Sealed(LIST_ONE), K1_2).moves_values(),
    row("lmpop", Class::Sealed(LIST_MPOP), Keys::NumKeys { at: 1, dest: false }),
    row("lolwut", Class::Forward, NONE),
    row("lpop", Class::Sealed(LIST_POP), K1),
    row("lpos", Class::Sealed(LIST_POS), K1),
    row("lpush", Class::Sealed(LIST_PUSH), K1),
    row("lpushx", Class::Sealed(LIST_PUSH), K1),
    row("lrange", Class::Sealed(LIST_POP), K1).bulky(),
    row("lrem", Class::Sealed(LIST_REM), K1),
    row("lset", Class::Sealed(LIST_SET), K1),
    row("ltrim", Class::Forward, K1),
    row("memory", Class::Forward, K2),
    row("mget", Class::Sealed(MGET), ALL).in_cluster(InCluster::Split(Combine::KeyOrder)),
    row("migrate", Class::Refuse(MIGRATE), NONE),
    row("module", Class::Forward, NONE),
    row("monitor", Class::Refuse(MONITOR), NONE),
    row("move", Class::Forward, K1),
    row("mset", Class::Sealed(MSET), Keys::Range { first: 1, last: -1, step: 2 }),
    row("msetnx", Class::Sealed(MSET), Keys::Range { first: 1, last: -1, step: 2 }),
    connection("multi", Handling::Multi)
        .leaves(Leaves::Transaction)
        .in_cluster(CLUSTER_TRANSACTIONS),
    row("object", Class::Forward, K2),
    row("persist", Class::Forward, K1),
    row("pexpire", Class::Forward, K1),
    row("pexpireat", Class::Forward, K1),
    row("pexpiretime", Class::Forward, K1),
    row("pfadd", Class::Sealed(PFADD), K1),
    row("pfcount", Class::Forward, ALL).moves_values(),
    row("pfdebug", Class::ServerReadsValue, K2),
    row("pfmerge", Class::Forward, ALL).moves_values(),
    row("pfselftest", Class::Forward, NONE),
    row("ping", Class::Forward, NONE),
    row("psetex", Class::Sealed(SETEX), K1),
    connection("psubscribe", Handling::Subscribe(PubSubKind::Pattern)).in_cluster(CLUSTER_PUBSUB),
    row("psync", Class::Refuse(REPLICATION), NONE),
    row("pttl", Class::Forward, K1),
    row("publish", Class::Sealed(PUBLISH), K1),
    row("pubsub", Class::Forward, NONE),
    connection("punsubscribe", Handling::Unsubscribe(PubSubKind::Pattern))
        .in_cluster(CLUSTER_PUBSUB),
    connection("quit", Handling::Quit),
    row("randomkey", Class::Forward, NONE).in_cluster(CLUSTER_EVERY_PRIMARY),
    row("readonly", Class::Forward, NONE)
        .leaves(Leaves::Session)
        .in_cluster(CLUSTER_ROUTING),
    row("readwrite", Class::Forward, NONE)
        .leaves(Leaves::Session)
        .in_cluster(CLUSTER_ROUTING),
    row("rename", Class::Forward, K1_2).moves_values(),
    row("renamenx", Class::Forward, K1_2).moves_values(),
    row("replconf", Class::Refuse(REPLICATION), NONE),
    row("replicaof", Class::Forward, NONE),
    connection("reset", Handling::Reset).in_cluster(InCluster::Reset),
    row("restore", Class::ServerReadsValue, K1),
    row("restore-asking", Class::ServerReadsValue, K1),
    row("role", Class::Forward, NONE),
    row("rpop", Class::Sealed(LIST_POP), K1),
    row("rpoplpush", Class::Sealed(LIST_ONE), K1_2).moves_values(),
    row("rpush", Class::Sealed(LIST_PUSH), K1),
    row("rpushx", Class::Sealed(LIST_PUSH), K1),
    row("sadd", Class::Sealed(SET_ADD), K1),
    row("save", Class::Forward, NONE),
    row("scan", Class::Forward, NONE).in_cluster(InCluster::Scan),
    row("scard", Class::Forward, K1),
    row("script", Class::Scripting(Scripting::Script), NONE)
        .in_cluster(InCluster::EveryPrimary(Combine::Same)),
    row("sdiff", Class::Sealed(SET_READ), ALL).moves_values().bulky(),
    row("sdiffstore", Class::Sealed(SET_STORE), ALL).moves_values(),
    row("select", Class::Forward, NONE).leaves(Leaves::Database),
    row("set", Class::Sealed(SET), K1),
    row("setbit", Class::ServerReadsValue, K1),
    row("setex", Class::Sealed(SETEX), K1),
    row("setnx", Class::Sealed(SETNX), K1),
    row("setrange", Class::ServerReadsValue, K1),
    row("shutdown", Class::Forward, NONE),
    row("sinter", Class::Sealed(SET_READ), ALL).moves_values().bulky(),
    row("sintercard", Class::Sealed(SET_STORE), Keys::NumKeys { at: 1, dest: false }).moves_values(),
    row("sinterstore", Class::Sealed(SET_STORE), ALL).moves_values(),
    row("sismember", Class::Sealed(SET_IS), K1),
    row("slaveof", Class::Forward, NONE),
    row("slowlog", Class::Forward, NONE),
    row("smembers", Class::Sealed(SET_READ), K1).bulky(),
    row("smismember", Class::Sealed(SET_ADD), K1),
    row("smove", Class::Sealed(SET_MOVE), K1_2).moves_values(),
    row("sort", Class::Sort, Keys::SortStore).bulky(),
    row("sort_ro", Class::Sort, Keys::SortStore).bulky(),
    row("spop", Class::Sealed(SET_READ), K1),
    row("spublish", Class::Sealed(PUBLISH), K1),
    row("srandmember", Class::Sealed(SET_READ), K1),
    row("srem", Class::Sealed(SET_ADD), K1),
    row("sscan", Class::Sealed(SET_SCAN), K1),
    connection("ssubscribe", Handling::Subscribe(PubSubKind::Shard)).in_cluster(CLUSTER_PUBSUB),
    row("strlen", Class::ServerReadsValue, K1),
    connection("subscribe", Handling::Subscribe(PubSubKind::Channel)).in_cluster(CLUSTER_PUBSUB),
    row("substr", Class::ServerReadsValue, K1),
    row("sunion", Class::Sealed(SET_READ), ALL).moves_values().bulky(),
    row("sunionstore", Class::Sealed(SET_STORE), ALL).moves_values(),
    connection("sunsubscribe", Handling::Unsubscribe(PubSubKind::Shard))
        .in_cluster(CLUSTER_PUBSUB),
    row("swapdb", Class::Forward, NONE),
    row("sync", Class::Refuse(REPLICATION), NONE),
    row("time", Class::Forward, NONE),
    row("touch", Class::Forward, ALL).in_cluster(CLUSTER_SPLIT_COUNT),
    row("ttl", Class::Forward, K1),
    row("type", Class::Forward, K1),
    row("unlink", Class::Forward, ALL).in_cluster(CLUSTER_SPLIT_COUNT),
    connection("unsubscribe", Handling::Unsubscribe(PubSubKind::Channel))
        .in_cluster(CLUSTER_PUBSUB),
    row("unwatch", Class::Forward, NONE)
        .leaves(Leaves::Transaction)
        .in_cluster(CLUSTER_TRANSACTIONS),
    row("wait", Class::Forward, NONE)
        .blocks(Timeout::SecondMillis)
        .in_cluster(CLUSTER_EVERY_PRIMARY),
    row("watch", Class::Forward, ALL)
        .leaves(Leaves::Transaction)
        .in_cluster(CLUSTER_TRANSACTIONS),
    row("xack", Class::Forward, K1),
    row("xadd", Class::Sealed(STREAM_ADD), K1),
    row("xautoclaim", Class::Sealed(STREAM_AUTOCLAIM), K1),
    row("xclaim", Class::Sealed(STREAM_CLAIM), K1),
    row("xdel", Class::Forward, K1),
    row("xgroup", Class::Forward, K2),
    row("xinfo", Class::Sealed(STREAM_INFO), K2),
    row("xlen", Class::Forward, K1),
    row("xpending", Class::Forward, K1),
    row("xrange", Class::Sealed(STREAM_RANGE), K1).bulky(),
    row("xread", Class::Sealed(STREAM_READ), Keys::Streams).blocks(Timeout::BlockOptionMillis),
    row("xreadgroup", Class::Sealed(STREAM_READ), Keys::Streams).blocks(Timeout::BlockOptionMillis),
    row("xrevrange", Class::Sealed(STREAM_RANGE), K1).bulky(),
    row("xsetid", Class::Forward, K1),
    row("xtrim", Class::Forward, K1),
    row("zadd", Class::Sealed(ZSET_ADD), K1),
    row("zcard", Class::Forward, K1),
    row("zcount", Class::Forward, K1),
    row("zdiff", Class::Sealed(ZSET_ALGEBRA), Keys::NumKeys { at: 1, dest: false }).moves_values().bulky(),
    row("zdiffstore", Class::Sealed(ZSET_STORE), Keys::NumKeys { at: 2, dest: true }).moves_values(),
    row("zincrby", Class::Sealed(ZSET_INCR), K1),
    row("zinter", Class::Sealed(ZSET_ALGEBRA), Keys::NumKeys { at: 1, dest: false }).moves_values().bulky(),
    row("zintercard", Class::Sealed(ZSET_STORE), Keys::NumKeys { at: 1, dest: false }).moves_values(),
    row("zinterstore", Class::Sealed(ZSET_STORE), Keys::NumKeys { at: 2, dest: true }).moves_values(),
    row("zlexcount", Class::OrdersValues, K1),
    row("zmpop", Class::Sealed(ZSET_MPOP), Keys::NumKeys { at: 1, dest: false }),
    row("zmscore", Class::Sealed(ZSET_MEMBERS), K1),
    row("zpopmax", Class::Sealed(ZSET_POP), K1),
    row("zpopmin", Class::Sealed(ZSET_POP), K1),
    row("zrandmember", Class::Sealed(ZSET_RANDOM), K1),
    row("zrange", Class::Sealed(ZSET_RANGE), K1).bulky(),
    row("zrangebylex", Class::OrdersValues, K1).bulky(),
    row("zrangebyscore", Class::Sealed(ZSET_RANGE), K1).bulky(),
    row("zrangestore", Class::Sealed(ZSET_STORE), K1_2).moves_values(),
    row("zrank", Class::Sealed(ZSET_MEMBER), K1),
    row("zrem", Class::Sealed(ZSET_MEMBERS), K1),
    row("zremrangebylex", Class::OrdersValues, K1),
    row("zremrangebyrank", Class::Forward, K1),
    row("zremrangebyscore", Class::Forward, K1),
    row("zrevrange", Class::Sealed(ZSET_RANGE), K1).bulky(),
    row("zrevrangebylex", Class::OrdersValues, K1).bulky(),
    row("zrevrangebyscore", Class::Sealed(ZSET_RANGE), K1).bulky(),
    row("zrevrank", Class::Sealed(ZSET_MEMBER), K1),
    row("zscan", Class::Sealed(ZSET_SCAN), K1),
    row("zscore", Class::Sealed(ZSET_MEMBER), K1),
    row("zunion", Class::Sealed(ZSET_ALGEBRA), Keys::NumKeys { at: 1, dest: false }).moves_values().bulky(),
    row("zunionstore", Class::Sealed(ZSET_STORE), Keys::NumKeys { at: 2, dest: true }).moves_values(),
];

/// How long Redis may legitimately take to answer a command beyond its
/// usual work: blocking commands wait as long as their timeout says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocks {
    /// Answers at once.
    No,
    /// Waits up to this long.
    For(std::time::Duration),
    /// May wait forever (a timeout of 0).
    Forever,
}

/// Where a blocking command's timeout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// Seconds (a float) in the last argument.
    LastSeconds,
    /// Seconds in argument 1.
    FirstSeconds,
    /// Milliseconds after a BLOCK option (none: it does not block).
    BlockOptionMillis,
    /// Milliseconds in argument 2.
    SecondMillis,
}

/// How long the command in `args` may block. A timeout that does not parse
/// makes Redis answer with an error at once.
pub fn blocks(row: Option<&Row>, args: &[Bytes]) -> Blocks {
    let Some(timeout) = row.and_then(|row| row.blocks) else {
        return Blocks::No;
    };
    let number = |arg: Option<&Bytes>| -> Option<f64> {
        std::str::from_utf8(arg?)
            .ok()?
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    let seconds = match timeout {
        Timeout::LastSeconds => number(args.last()),
        Timeout::FirstSeconds => number(args.get(1)),
        Timeout::SecondMillis => number(args.get(2)).map(|ms| ms / 1000.0),
        Timeout::BlockOptionMillis => {
            let at = args.iter().position(|a| a.eq_ignore_ascii_case(b"block"));
            match at {
                None => return Blocks::No,
                Some(at) => number(args.get(at + 1)).map(|ms| ms / 1000.0),
            }
        }
    };
    match seconds {
        None => Blocks::No,
        Some(0.0) => Blocks::Forever,
        Some(s) => Blocks::For(std::time::Duration::from_secs_f64(s.min(1e9))),
    }
}

/// What a forwarded command leaves on the upstream connection once it is
/// answered: what must be undone before the connection serves another
/// client (or this client, on another connection, after a pause).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Leaves {
    /// Nothing: the connection is as it was when it logged in.
    Nothing,
    /// Another database is selected: `SELECT 0` undoes it.
    Database,
    /// MULTI or WATCH state: EXEC, DISCARD, UNWATCH or RESET end it, and
    /// the session knows when they have (`RequestState::holds_transaction`),
    /// so it counts only while it lasts (a pinned client that finished its
    /// transactions can be parked and go back to lanes).
    Transaction,
    /// Anything else a connection remembers (MULTI, WATCH, subscriptions,
    /// tracking, names, protocol, cluster flags) or may remember (commands
    /// without a row, DEBUG): only RESET and AUTH undo it.
    Session,
}

/// What forwarding a command with this row (`None`: no row) leaves behind.
/// Whether a command's reply grows with the data (see [`Row::bulky`]).
pub fn bulky(row: Option<&Row>) -> bool {
    row.is_some_and(|row| row.bulky)
}

pub fn leaves(row: Option<&Row>) -> Leaves {
    row.map_or(Leaves::Session, |row| row.leaves)
}

/// The row for a command name, matched case-insensitively.
pub fn lookup(name: &[u8]) -> Option<&'static Row> {
    identify(name).1
}

/// A command's identity in metrics: its row, or `other` for names the table
/// does not know (so label values stay bounded whatever clients send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandId(u16);

impl CommandId {
    /// Every identity there is: one per row, then `other`.
    pub const COUNT: usize = COMMANDS.len() + 1;
    pub const OTHER: CommandId = CommandId(COMMANDS.len() as u16);

    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The lower-case command name, or `other`.
    pub fn name(self) -> &'static str {
        COMMANDS.get(self.index()).map_or("other", |row| row.name)
    }
}

/// The identity and row of a command name (any case).
pub fn identify(name: &[u8]) -> (CommandId, Option<&'static Row>) {
    let mut lower = [0u8; 32];
    let Some(lower) = lower.get_mut(..name.len()) else {
        return (CommandId::OTHER, None);
    };
    for (to, from) in lower.iter_mut().zip(name) {
        *to = from.to_ascii_lowercase();
    }
    match by_name().get(&*lower) {
        Some(&i) => (CommandId(i), Some(&COMMANDS[usize::from(i)])),
        None => (CommandId::OTHER, None),
    }
}

/// Each row's index by name: a lookup is one hash of the name and one
/// comparison (a binary search compared ~8 names per request). Clients
/// choose the names looked up but insert nothing, so colliding names cost
/// no more than a few comparisons.
fn by_name() -> &'static HashMap<&'static [u8], u16, BuildHasherDefault<NameHasher>> {
    static BY_NAME: OnceLock<HashMap<&'static [u8], u16, BuildHasherDefault<NameHasher>>> =
        OnceLock::new();
    BY_NAME.get_or_init(|| {
        COMMANDS
            .iter()
            .enumerate()
            .map(|(i, row)| (row.name.as_bytes(), i as u16))
            .collect()
    })
}

/// FNV-1a: short names hash in a few nanoseconds.
struct NameHasher(u64);

impl Default for NameHasher {
    fn default() -> Self {
        NameHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Where XREAD's and XREADGROUP's stream names start, read as Redis's
/// `xreadCommand` reads its options: BLOCK and COUNT take one argument,
/// GROUP two (so a group or consumer named `streams` is not the keyword),
/// NOACK none; STREAMS ends them. Anything else is a syntax error.
fn streams_start(args: &[Bytes]) -> Option<usize> {
    let mut i = 1;
    while let Some(option) = args.get(i) {
        let more = args.len() - i - 1;
        let is = |word: &[u8]| option.eq_ignore_ascii_case(word);
        if (is(b"block") || is(b"count")) && more >= 1 {
            i += 2;
        } else if is(b"group") && more >= 2 {
            i += 3;
        } else if is(b"noack") {
            i += 1;
        } else if is(b"streams") && more >= 1 {
            return Some(i + 1);
        } else {
            return None;
        }
    }
    None
}

/// SORT's STORE key, as `sortGetKeys` finds it: LIMIT skips two
/// arguments, GET and BY one, and the last STORE wins.
fn sort_store(args: &[Bytes]) -> Option<usize> {
    let (mut i, mut store) = (2, None);
    while let Some(arg) = args.get(i) {
        let is = |word: &[u8]| arg.eq_ignore_ascii_case(word);
        if is(b"limit") {
            i += 2;
        } else if is(b"store") && i + 1 < args.len() {
            store = Some(i + 1);
        } else if is(b"get") || is(b"by") {
            i += 1;
        }
        i += 1;
    }
    store
}

impl Keys {
    /// The first key's index, as [`Keys::positions`] would give it, without
    /// building the list for the common layouts.
    pub fn first(&self, args: &[Bytes]) -> Option<usize> {
        match *self {
            Keys::Range {
                first, last: 1.., ..
            } if usize::from(first) < args.len() => Some(usize::from(first)),
            _ => self.positions(args).first().copied(),
        }
    }

    /// Every argument that follows a STORE or STOREDIST word among the
    /// options: where Redis's parser may write (it takes the last one; its
    /// key specs name the first). Values may move only to keys that share
    /// the first key's binding, so those checks take all of them.
    pub fn store_candidates(&self, args: &[Bytes]) -> Vec<usize> {
        let options_from = match self {
            Keys::SortStore => 2,
            Keys::GeoStore { options_from } => usize::from(*options_from),
            _ => return Vec::new(),
        };
        (options_from..args.len().saturating_sub(1))
            .filter(|&i| {
                args[i].eq_ignore_ascii_case(b"store") || args[i].eq_ignore_ascii_case(b"storedist")
            })
            .map(|i| i + 1)
            .collect()
    }
}

impl Keys {
    /// Indices of the key arguments in `args`. Malformed requests yield the
    /// keys that can be found; Redis rejects the rest itself.
    pub fn positions(&self, args: &[Bytes]) -> Vec<usize> {
        let len = args.len();
        match *self {
            Keys::None => Vec::new(),
            Keys::Range { first, last, step } => {
                let last = if last < 0 {
                    len as isize + last as isize
                } else {
                    last as isize
                };
                let last = last.min(len as isize - 1);
                if last < first as isize {
                    return Vec::new();
                }
                (first as usize..=last as usize)
                    .step_by(step.max(1) as usize)
                    .collect()
            }
            Keys::NumKeys { at, dest } => {
                let at = at as usize;
                let count = args
                    .get(at)
                    .and_then(|n| std::str::from_utf8(n).ok())
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0);
                // As Redis: a count the arguments cannot hold means no keys
                // (and Redis refuses the command).
                if count > len.saturating_sub(at + 1) {
                    return Vec::new();
                }
                let mut keys: Vec<usize> = ((at + 1)..at + 1 + count).collect();
                if dest && len > 1 {
                    keys.insert(0, 1);
                }
                keys
            }
            Keys::Streams => {
                let Some(first) = streams_start(args) else {
                    return Vec::new();
                };
                let rest = len - first;
                if !rest.is_multiple_of(2) {
                    return Vec::new();
                }
                (first..first + rest / 2).collect()
            }
            Keys::SortStore => {
                let mut keys = if len > 1 { vec![1] } else { Vec::new() };
                keys.extend(sort_store(args));
                keys
            }
            Keys::GeoStore { options_from } => {
                let mut keys = if len > 1 { vec![1] } else { Vec::new() };
                for word in [&b"store"[..], b"storedist"] {
                    let found = (usize::from(options_from)..len.saturating_sub(1))
                        .find(|&i| args[i].eq_ignore_ascii_case(word));
                    keys.extend(found.map(|i| i + 1));
                }
                keys
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<Bytes> {
        text.split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn keys_of(command: &str) -> Vec<String> {
        let args = args(command);
        let row = lookup(&args[0]).expect("known command");
        row.keys
            .positions(&args)
            .into_iter()
            .map(|i| String::from_utf8_lossy(&args[i]).into_owned())
            .collect()
    }

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
    fn command_ids_name_known_commands_and_fold_the_rest_into_other() {
        assert_eq!(identify(b"GeT").0.name(), "get");
        assert_eq!(identify(b"hset").0.name(), "hset");
        assert_eq!(identify(b"nosuchcommand").0, CommandId::OTHER);
        assert_eq!(identify(&[b'x'; 100]).0.name(), "other");
        assert_eq!(CommandId::OTHER.index(), CommandId::COUNT - 1);
        for (i, row) in COMMANDS.iter().enumerate() {
            let upper = row.name.to_ascii_uppercase();
            for name in [row.name.as_bytes(), upper.as_bytes()] {
                let (id, found) = identify(name);
                assert_eq!(id.index(), i);
                assert!(found.is_some_and(|found| std::ptr::eq(found, row)));
            }
            let longer = format!("{}x", row.name);
            assert!(
                identify(longer.as_bytes())
                    .1
                    .is_none_or(|r| r.name != row.name)
            );
        }
    }

    #[test]
    fn lookup_ignores_case_and_rejects_unknown_names() {
        assert_eq!(lookup(b"AuTh").map(|r| r.name), Some("auth"));
        assert_eq!(lookup(b"GET").map(|r| r.class), Some(Class::Sealed(GET)));
        assert!(lookup(b"notacommand").is_none());
        assert!(lookup(&[b'a'; 40]).is_none());
        assert!(lookup(b"").is_none());
    }

    #[test]
    fn finds_keys_in_every_layout() {
        assert_eq!(keys_of("APPEND k v"), ["k"]);
        assert_eq!(keys_of("MSET a 1 b 2"), ["a", "b"]);
        assert_eq!(keys_of("BLPOP a b 0"), ["a", "b"]);
        assert_eq!(keys_of("BITOP AND dest a b"), ["dest", "a", "b"]);
        assert_eq!(keys_of("EVAL script 2 k1 k2 arg"), ["k1", "k2"]);
        assert_eq!(keys_of("EVAL script 0 arg"), Vec::<String>::new());
        assert_eq!(keys_of("EVAL script 9 k1"), Vec::<String>::new());
        assert_eq!(
            keys_of("ZUNIONSTORE dest 2 a b WEIGHTS 1 2"),
            ["dest", "a", "b"]
        );
        assert_eq!(keys_of("XREAD COUNT 2 STREAMS s1 s2 0 0"), ["s1", "s2"]);
        assert_eq!(
            keys_of("XREADGROUP GROUP streams streams COUNT 1 STREAMS s1 >"),
            ["s1"]
        );
        assert_eq!(keys_of("XREAD STREAMS s1 s2 0"), Vec::<String>::new());
        assert_eq!(keys_of("SORT list BY w_* STORE out"), ["list", "out"]);
        assert_eq!(keys_of("OBJECT ENCODING k"), ["k"]);
        assert_eq!(keys_of("OBJECT HELP"), Vec::<String>::new());
        assert_eq!(keys_of("PUBLISH channel message"), ["channel"]);
    }

    #[test]
    fn blocking_commands_say_how_long_they_may_wait() {
        let blocks_of = |text: &str| {
            let args = args(text);
            blocks(lookup(&args[0]), &args)
        };
        let secs = |s: f64| Blocks::For(std::time::Duration::from_secs_f64(s));
        assert_eq!(blocks_of("BLPOP a b 2.5"), secs(2.5));
        assert_eq!(blocks_of("BLPOP a 0"), Blocks::Forever);
        assert_eq!(blocks_of("BLMPOP 3 1 a LEFT"), secs(3.0));
        assert_eq!(blocks_of("XREAD COUNT 1 BLOCK 1500 STREAMS s 0"), secs(1.5));
        assert_eq!(blocks_of("XREAD COUNT 1 STREAMS s 0"), Blocks::No);
        assert_eq!(
            blocks_of("XREADGROUP GROUP g c BLOCK 0 STREAMS s >"),
            Blocks::Forever
        );
        assert_eq!(blocks_of("WAIT 1 200"), secs(0.2));
        assert_eq!(blocks_of("BLPOP a nonsense"), Blocks::No);
        assert_eq!(blocks_of("GET a"), Blocks::No);
        let blocking: Vec<_> = COMMANDS
            .iter()
            .filter(|row| row.blocks.is_some())
            .map(|row| row.name)
            .collect();
        assert_eq!(
            blocking,
            [
                "blmove",
                "blmpop",
                "blpop",
                "brpop",
                "brpoplpush",
                "bzmpop",
                "bzpopmax",
                "bzpopmin",
                "wait",
                "xread",
                "xreadgroup"
            ]
        );
    }

    #[test]
    fn only_plain_data_commands_leave_nothing_on_the_connection() {
        let change_the_connection = ["asking", "debug", "readonly", "readwrite"];
        let transaction = ["multi", "exec", "discard", "watch", "unwatch"];
        for row in COMMANDS {
            let leaves = leaves(Some(row));
            match row.class {
                _ if transaction.contains(&row.name) => {
                    assert_eq!(leaves, Leaves::Transaction, "{}", row.name)
                }
                Class::Connection(_) => assert_eq!(leaves, Leaves::Session, "{}", row.name),
                _ if change_the_connection.contains(&row.name) => {
                    assert_eq!(leaves, Leaves::Session)
                }
                _ if row.name == "select" => assert_eq!(leaves, Leaves::Database),
                _ => assert_eq!(leaves, Leaves::Nothing, "{}", row.name),
            }
        }
        assert_eq!(leaves(lookup(b"SET")), Leaves::Nothing);
        assert_eq!(leaves(lookup(b"Client")), Leaves::Session);
        assert_eq!(leaves(lookup(b"WATCH")), Leaves::Transaction);
        assert_eq!(leaves(None), Leaves::Session);
    }

    #[test]
    fn values_move_only_in_commands_that_say_so() {
        let moving: Vec<_> = COMMANDS
            .iter()
            .filter(|row| row.moves_values)
            .map(|row| row.name)
            .collect();
        assert_eq!(
            moving,
            [
                "blmove",
                "brpoplpush",
                "copy",
                "georadius",
                "georadiusbymember",
                "geosearchstore",
                "lmove",
                "pfcount",
                "pfmerge",
                "rename",
                "renamenx",
                "rpoplpush",
                "sdiff",
                "sdiffstore",
                "sinter",
                "sintercard",
                "sinterstore",
                "smove",
                "sunion",
                "sunionstore",
                "zdiff",
                "zdiffstore",
                "zinter",
                "zintercard",
                "zinterstore",
                "zrangestore",
                "zunion",
                "zunionstore",
            ]
        );
    }
}
