//! The one table of Redis commands: every command Redis 7.0 lists in
//! `COMMAND`, one row each, sorted by lower-case name (tests check both).
//!
//! A row says what class the command is and where its keys are. The class
//! decides what the proxy may do (see `Class`); commands without a row are
//! refused unless `encryption.unknown_commands = "pass"`, because forwarding
//! a command we do not understand could store a value in the clear.
//! Refusal texts live here and nowhere else.

use bytes::Bytes;

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

/// String and hash commands whose values redcloak seals and opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueCommand {
    Set,
    SetNx,
    SetEx,
    PSetEx,
    GetSet,
    Get,
    GetDel,
    GetEx,
    MGet,
    MSet,
    MSetNx,
    HSet,
    HSetNx,
    HMSet,
    HGet,
    HMGet,
    HGetAll,
    HVals,
    HRandField,
    HScan,
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
    /// No stored value crosses: forwarded whatever its keys' rules
    /// (key space, TTLs, hash field names, server and admin commands).
    Forward,
    /// Values are sealed on the way in and opened on the way out.
    Value(ValueCommand),
    /// Redis must read or compute on the value: forwarded only when every
    /// key's rule is plaintext.
    ServerReadsValue,
    /// Lists, sets, sorted sets, streams, geo, HyperLogLog, channels: not
    /// encrypted yet, so forwarded only when every key's rule is plaintext.
    Collection,
    /// RENAME, RENAMENX, COPY: a key-bound value under a new name would no
    /// longer open; forwarded when both keys are plaintext, or both are
    /// encrypted without key binding.
    MovesValue,
    /// SORT: a collection; BY and GET make Redis read other keys' values.
    Sort,
    /// Lua scripts and functions: run only when `policy::script` proves
    /// they touch no key but the ones they declare.
    Scripting(Scripting),
    Refuse(&'static str),
}

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
    /// Argument 1, and the argument after STORE or STOREDIST.
    WithStore,
}

pub struct Row {
    pub name: &'static str,
    pub class: Class,
    pub keys: Keys,
}

const MONITOR: &str = "MONITOR is not proxied: its stream does not fit the request/reply pipeline; \
run it against Redis directly with an admin account";
const MIGRATE: &str = "MIGRATE is not proxied: Redis would send the stored value to another server \
over plaintext TCP and make connections anywhere; move data with redcloak in front of both sides";
const REPLICATION: &str =
    "replication commands are not proxied; connect replicas to Redis directly";

/// The common key layout: argument 1 is the only key.
const K1: Keys = Keys::Range {
    first: 1,
    last: 1,
    step: 1,
};

#[rustfmt::skip]
pub static COMMANDS: &[Row] = &[
    Row { name: "acl", class: Class::Forward, keys: Keys::None },
    Row { name: "append", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "asking", class: Class::Forward, keys: Keys::None },
    Row { name: "auth", class: Class::Connection(Handling::Auth), keys: Keys::None },
    Row { name: "bgrewriteaof", class: Class::Forward, keys: Keys::None },
    Row { name: "bgsave", class: Class::Forward, keys: Keys::None },
    Row { name: "bitcount", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "bitfield", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "bitfield_ro", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "bitop", class: Class::ServerReadsValue, keys: Keys::Range { first: 2, last: -1, step: 1 } },
    Row { name: "bitpos", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "blmove", class: Class::Collection, keys: Keys::Range { first: 1, last: 2, step: 1 } },
    Row { name: "blmpop", class: Class::Collection, keys: Keys::NumKeys { at: 2, dest: false } },
    Row { name: "blpop", class: Class::Collection, keys: Keys::Range { first: 1, last: -2, step: 1 } },
    Row { name: "brpop", class: Class::Collection, keys: Keys::Range { first: 1, last: -2, step: 1 } },
    Row { name: "brpoplpush", class: Class::Collection, keys: Keys::Range { first: 1, last: 2, step: 1 } },
    Row { name: "bzmpop", class: Class::Collection, keys: Keys::NumKeys { at: 2, dest: false } },
    Row { name: "bzpopmax", class: Class::Collection, keys: Keys::Range { first: 1, last: -2, step: 1 } },
    Row { name: "bzpopmin", class: Class::Collection, keys: Keys::Range { first: 1, last: -2, step: 1 } },
    Row { name: "client", class: Class::Connection(Handling::Client), keys: Keys::None },
    Row { name: "cluster", class: Class::Forward, keys: Keys::None },
    Row { name: "command", class: Class::Forward, keys: Keys::None },
    Row { name: "config", class: Class::Forward, keys: Keys::None },
    Row { name: "copy", class: Class::MovesValue, keys: Keys::Range { first: 1, last: 2, step: 1 } },
    Row { name: "dbsize", class: Class::Forward, keys: Keys::None },
    Row { name: "debug", class: Class::Forward, keys: Keys::None },
    Row { name: "decr", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "decrby", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "del", class: Class::Forward, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "discard", class: Class::Connection(Handling::Discard), keys: Keys::None },
    Row { name: "dump", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "echo", class: Class::Forward, keys: Keys::None },
    Row { name: "eval", class: Class::Scripting(Scripting::Eval), keys: Keys::NumKeys { at: 2, dest: false } },
    Row { name: "eval_ro", class: Class::Scripting(Scripting::Eval), keys: Keys::NumKeys { at: 2, dest: false } },
    Row { name: "evalsha", class: Class::Scripting(Scripting::EvalSha), keys: Keys::NumKeys { at: 2, dest: false } },
    Row { name: "evalsha_ro", class: Class::Scripting(Scripting::EvalSha), keys: Keys::NumKeys { at: 2, dest: false } },
    Row { name: "exec", class: Class::Connection(Handling::Exec), keys: Keys::None },
    Row { name: "exists", class: Class::Forward, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "expire", class: Class::Forward, keys: K1 },
    Row { name: "expireat", class: Class::Forward, keys: K1 },
    Row { name: "expiretime", class: Class::Forward, keys: K1 },
    Row { name: "failover", class: Class::Forward, keys: Keys::None },
    Row { name: "fcall", class: Class::Scripting(Scripting::FCall), keys: Keys::NumKeys { at: 2, dest: false } },
    Row { name: "fcall_ro", class: Class::Scripting(Scripting::FCall), keys: Keys::NumKeys { at: 2, dest: false } },
    Row { name: "flushall", class: Class::Forward, keys: Keys::None },
    Row { name: "flushdb", class: Class::Forward, keys: Keys::None },
    Row { name: "function", class: Class::Scripting(Scripting::Function), keys: Keys::None },
    Row { name: "geoadd", class: Class::Collection, keys: K1 },
    Row { name: "geodist", class: Class::Collection, keys: K1 },
    Row { name: "geohash", class: Class::Collection, keys: K1 },
    Row { name: "geopos", class: Class::Collection, keys: K1 },
    Row { name: "georadius", class: Class::Collection, keys: Keys::WithStore },
    Row { name: "georadius_ro", class: Class::Collection, keys: K1 },
    Row { name: "georadiusbymember", class: Class::Collection, keys: Keys::WithStore },
    Row { name: "georadiusbymember_ro", class: Class::Collection, keys: K1 },
    Row { name: "geosearch", class: Class::Collection, keys: K1 },
    Row { name: "geosearchstore", class: Class::Collection, keys: Keys::Range { first: 1, last: 2, step: 1 } },
    Row { name: "get", class: Class::Value(ValueCommand::Get), keys: K1 },
    Row { name: "getbit", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "getdel", class: Class::Value(ValueCommand::GetDel), keys: K1 },
    Row { name: "getex", class: Class::Value(ValueCommand::GetEx), keys: K1 },
    Row { name: "getrange", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "getset", class: Class::Value(ValueCommand::GetSet), keys: K1 },
    Row { name: "hdel", class: Class::Forward, keys: K1 },
    Row { name: "hello", class: Class::Connection(Handling::Hello), keys: Keys::None },
    Row { name: "hexists", class: Class::Forward, keys: K1 },
    Row { name: "hget", class: Class::Value(ValueCommand::HGet), keys: K1 },
    Row { name: "hgetall", class: Class::Value(ValueCommand::HGetAll), keys: K1 },
    Row { name: "hincrby", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "hincrbyfloat", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "hkeys", class: Class::Forward, keys: K1 },
    Row { name: "hlen", class: Class::Forward, keys: K1 },
    Row { name: "hmget", class: Class::Value(ValueCommand::HMGet), keys: K1 },
    Row { name: "hmset", class: Class::Value(ValueCommand::HMSet), keys: K1 },
    Row { name: "hrandfield", class: Class::Value(ValueCommand::HRandField), keys: K1 },
    Row { name: "hscan", class: Class::Value(ValueCommand::HScan), keys: K1 },
    Row { name: "hset", class: Class::Value(ValueCommand::HSet), keys: K1 },
    Row { name: "hsetnx", class: Class::Value(ValueCommand::HSetNx), keys: K1 },
    Row { name: "hstrlen", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "hvals", class: Class::Value(ValueCommand::HVals), keys: K1 },
    Row { name: "incr", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "incrby", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "incrbyfloat", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "info", class: Class::Forward, keys: Keys::None },
    Row { name: "keys", class: Class::Forward, keys: Keys::None },
    Row { name: "lastsave", class: Class::Forward, keys: Keys::None },
    Row { name: "latency", class: Class::Forward, keys: Keys::None },
    Row { name: "lcs", class: Class::ServerReadsValue, keys: Keys::Range { first: 1, last: 2, step: 1 } },
    Row { name: "lindex", class: Class::Collection, keys: K1 },
    Row { name: "linsert", class: Class::Collection, keys: K1 },
    Row { name: "llen", class: Class::Collection, keys: K1 },
    Row { name: "lmove", class: Class::Collection, keys: Keys::Range { first: 1, last: 2, step: 1 } },
    Row { name: "lmpop", class: Class::Collection, keys: Keys::NumKeys { at: 1, dest: false } },
    Row { name: "lolwut", class: Class::Forward, keys: Keys::None },
    Row { name: "lpop", class: Class::Collection, keys: K1 },
    Row { name: "lpos", class: Class::Collection, keys: K1 },
    Row { name: "lpush", class: Class::Collection, keys: K1 },
    Row { name: "lpushx", class: Class::Collection, keys: K1 },
    Row { name: "lrange", class: Class::Collection, keys: K1 },
    Row { name: "lrem", class: Class::Collection, keys: K1 },
    Row { name: "lset", class: Class::Collection, keys: K1 },
    Row { name: "ltrim", class: Class::Collection, keys: K1 },
    Row { name: "memory", class: Class::Forward, keys: Keys::Range { first: 2, last: 2, step: 1 } },
    Row { name: "mget", class: Class::Value(ValueCommand::MGet), keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "migrate", class: Class::Refuse(MIGRATE), keys: Keys::None },
    Row { name: "module", class: Class::Forward, keys: Keys::None },
    Row { name: "monitor", class: Class::Refuse(MONITOR), keys: Keys::None },
    Row { name: "move", class: Class::Forward, keys: K1 },
    Row { name: "mset", class: Class::Value(ValueCommand::MSet), keys: Keys::Range { first: 1, last: -1, step: 2 } },
    Row { name: "msetnx", class: Class::Value(ValueCommand::MSetNx), keys: Keys::Range { first: 1, last: -1, step: 2 } },
    Row { name: "multi", class: Class::Connection(Handling::Multi), keys: Keys::None },
    Row { name: "object", class: Class::ServerReadsValue, keys: Keys::Range { first: 2, last: 2, step: 1 } },
    Row { name: "persist", class: Class::Forward, keys: K1 },
    Row { name: "pexpire", class: Class::Forward, keys: K1 },
    Row { name: "pexpireat", class: Class::Forward, keys: K1 },
    Row { name: "pexpiretime", class: Class::Forward, keys: K1 },
    Row { name: "pfadd", class: Class::Collection, keys: K1 },
    Row { name: "pfcount", class: Class::Collection, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "pfdebug", class: Class::Collection, keys: Keys::Range { first: 2, last: 2, step: 1 } },
    Row { name: "pfmerge", class: Class::Collection, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "pfselftest", class: Class::Forward, keys: Keys::None },
    Row { name: "ping", class: Class::Forward, keys: Keys::None },
    Row { name: "psetex", class: Class::Value(ValueCommand::PSetEx), keys: K1 },
    Row { name: "psubscribe", class: Class::Connection(Handling::Subscribe(PubSubKind::Pattern)), keys: Keys::None },
    Row { name: "psync", class: Class::Refuse(REPLICATION), keys: Keys::None },
    Row { name: "pttl", class: Class::Forward, keys: K1 },
    Row { name: "publish", class: Class::Collection, keys: K1 },
    Row { name: "pubsub", class: Class::Forward, keys: Keys::None },
    Row { name: "punsubscribe", class: Class::Connection(Handling::Unsubscribe(PubSubKind::Pattern)), keys: Keys::None },
    Row { name: "quit", class: Class::Connection(Handling::Quit), keys: Keys::None },
    Row { name: "randomkey", class: Class::Forward, keys: Keys::None },
    Row { name: "readonly", class: Class::Forward, keys: Keys::None },
    Row { name: "readwrite", class: Class::Forward, keys: Keys::None },
    Row { name: "rename", class: Class::MovesValue, keys: Keys::Range { first: 1, last: 2, step: 1 } },
    Row { name: "renamenx", class: Class::MovesValue, keys: Keys::Range { first: 1, last: 2, step: 1 } },
    Row { name: "replconf", class: Class::Refuse(REPLICATION), keys: Keys::None },
    Row { name: "replicaof", class: Class::Forward, keys: Keys::None },
    Row { name: "reset", class: Class::Connection(Handling::Reset), keys: Keys::None },
    Row { name: "restore", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "restore-asking", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "role", class: Class::Forward, keys: Keys::None },
    Row { name: "rpop", class: Class::Collection, keys: K1 },
    Row { name: "rpoplpush", class: Class::Collection, keys: Keys::Range { first: 1, last: 2, step: 1 } },
    Row { name: "rpush", class: Class::Collection, keys: K1 },
    Row { name: "rpushx", class: Class::Collection, keys: K1 },
    Row { name: "sadd", class: Class::Collection, keys: K1 },
    Row { name: "save", class: Class::Forward, keys: Keys::None },
    Row { name: "scan", class: Class::Forward, keys: Keys::None },
    Row { name: "scard", class: Class::Collection, keys: K1 },
    Row { name: "script", class: Class::Scripting(Scripting::Script), keys: Keys::None },
    Row { name: "sdiff", class: Class::Collection, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "sdiffstore", class: Class::Collection, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "select", class: Class::Forward, keys: Keys::None },
    Row { name: "set", class: Class::Value(ValueCommand::Set), keys: K1 },
    Row { name: "setbit", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "setex", class: Class::Value(ValueCommand::SetEx), keys: K1 },
    Row { name: "setnx", class: Class::Value(ValueCommand::SetNx), keys: K1 },
    Row { name: "setrange", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "shutdown", class: Class::Forward, keys: Keys::None },
    Row { name: "sinter", class: Class::Collection, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "sintercard", class: Class::Collection, keys: Keys::NumKeys { at: 1, dest: false } },
    Row { name: "sinterstore", class: Class::Collection, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "sismember", class: Class::Collection, keys: K1 },
    Row { name: "slaveof", class: Class::Forward, keys: Keys::None },
    Row { name: "slowlog", class: Class::Forward, keys: Keys::None },
    Row { name: "smembers", class: Class::Collection, keys: K1 },
    Row { name: "smismember", class: Class::Collection, keys: K1 },
    Row { name: "smove", class: Class::Collection, keys: Keys::Range { first: 1, last: 2, step: 1 } },
    Row { name: "sort", class: Class::Sort, keys: Keys::WithStore },
    Row { name: "sort_ro", class: Class::Sort, keys: Keys::WithStore },
    Row { name: "spop", class: Class::Collection, keys: K1 },
    Row { name: "spublish", class: Class::Collection, keys: K1 },
    Row { name: "srandmember", class: Class::Collection, keys: K1 },
    Row { name: "srem", class: Class::Collection, keys: K1 },
    Row { name: "sscan", class: Class::Collection, keys: K1 },
    Row { name: "ssubscribe", class: Class::Connection(Handling::Subscribe(PubSubKind::Shard)), keys: Keys::None },
    Row { name: "strlen", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "subscribe", class: Class::Connection(Handling::Subscribe(PubSubKind::Channel)), keys: Keys::None },
    Row { name: "substr", class: Class::ServerReadsValue, keys: K1 },
    Row { name: "sunion", class: Class::Collection, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "sunionstore", class: Class::Collection, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "sunsubscribe", class: Class::Connection(Handling::Unsubscribe(PubSubKind::Shard)), keys: Keys::None },
    Row { name: "swapdb", class: Class::Forward, keys: Keys::None },
    Row { name: "sync", class: Class::Refuse(REPLICATION), keys: Keys::None },
    Row { name: "time", class: Class::Forward, keys: Keys::None },
    Row { name: "touch", class: Class::Forward, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "ttl", class: Class::Forward, keys: K1 },
    Row { name: "type", class: Class::Forward, keys: K1 },
    Row { name: "unlink", class: Class::Forward, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "unsubscribe", class: Class::Connection(Handling::Unsubscribe(PubSubKind::Channel)), keys: Keys::None },
    Row { name: "unwatch", class: Class::Forward, keys: Keys::None },
    Row { name: "wait", class: Class::Forward, keys: Keys::None },
    Row { name: "watch", class: Class::Forward, keys: Keys::Range { first: 1, last: -1, step: 1 } },
    Row { name: "xack", class: Class::Collection, keys: K1 },
    Row { name: "xadd", class: Class::Collection, keys: K1 },
    Row { name: "xautoclaim", class: Class::Collection, keys: K1 },
    Row { name: "xclaim", class: Class::Collection, keys: K1 },
    Row { name: "xdel", class: Class::Collection, keys: K1 },
    Row { name: "xgroup", class: Class::Collection, keys: Keys::Range { first: 2, last: 2, step: 1 } },
    Row { name: "xinfo", class: Class::Collection, keys: Keys::Range { first: 2, last: 2, step: 1 } },
    Row { name: "xlen", class: Class::Collection, keys: K1 },
    Row { name: "xpending", class: Class::Collection, keys: K1 },
    Row { name: "xrange", class: Class::Collection, keys: K1 },
    Row { name: "xread", class: Class::Collection, keys: Keys::Streams },
    Row { name: "xreadgroup", class: Class::Collection, keys: Keys::Streams },
    Row { name: "xrevrange", class: Class::Collection, keys: K1 },
    Row { name: "xsetid", class: Class::Collection, keys: K1 },
    Row { name: "xtrim", class: Class::Collection, keys: K1 },
    Row { name: "zadd", class: Class::Collection, keys: K1 },
    Row { name: "zcard", class: Class::Collection, keys: K1 },
    Row { name: "zcount", class: Class::Collection, keys: K1 },
    Row { name: "zdiff", class: Class::Collection, keys: Keys::NumKeys { at: 1, dest: false } },
    Row { name: "zdiffstore", class: Class::Collection, keys: Keys::NumKeys { at: 2, dest: true } },
    Row { name: "zincrby", class: Class::Collection, keys: K1 },
    Row { name: "zinter", class: Class::Collection, keys: Keys::NumKeys { at: 1, dest: false } },
    Row { name: "zintercard", class: Class::Collection, keys: Keys::NumKeys { at: 1, dest: false } },
    Row { name: "zinterstore", class: Class::Collection, keys: Keys::NumKeys { at: 2, dest: true } },
    Row { name: "zlexcount", class: Class::Collection, keys: K1 },
    Row { name: "zmpop", class: Class::Collection, keys: Keys::NumKeys { at: 1, dest: false } },
    Row { name: "zmscore", class: Class::Collection, keys: K1 },
    Row { name: "zpopmax", class: Class::Collection, keys: K1 },
    Row { name: "zpopmin", class: Class::Collection, keys: K1 },
    Row { name: "zrandmember", class: Class::Collection, keys: K1 },
    Row { name: "zrange", class: Class::Collection, keys: K1 },
    Row { name: "zrangebylex", class: Class::Collection, keys: K1 },
    Row { name: "zrangebyscore", class: Class::Collection, keys: K1 },
    Row { name: "zrangestore", class: Class::Collection, keys: Keys::Range { first: 1, last: 2, step: 1 } },
    Row { name: "zrank", class: Class::Collection, keys: K1 },
    Row { name: "zrem", class: Class::Collection, keys: K1 },
    Row { name: "zremrangebylex", class: Class::Collection, keys: K1 },
    Row { name: "zremrangebyrank", class: Class::Collection, keys: K1 },
    Row { name: "zremrangebyscore", class: Class::Collection, keys: K1 },
    Row { name: "zrevrange", class: Class::Collection, keys: K1 },
    Row { name: "zrevrangebylex", class: Class::Collection, keys: K1 },
    Row { name: "zrevrangebyscore", class: Class::Collection, keys: K1 },
    Row { name: "zrevrank", class: Class::Collection, keys: K1 },
    Row { name: "zscan", class: Class::Collection, keys: K1 },
    Row { name: "zscore", class: Class::Collection, keys: K1 },
    Row { name: "zunion", class: Class::Collection, keys: Keys::NumKeys { at: 1, dest: false } },
    Row { name: "zunionstore", class: Class::Collection, keys: Keys::NumKeys { at: 2, dest: true } },
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
#[derive(Debug, Clone, Copy)]
enum BlockTimeout {
    /// Seconds (a float) in the last argument.
    LastSeconds,
    /// Seconds in argument 1.
    FirstSeconds,
    /// Milliseconds after a BLOCK option.
    BlockOptionMillis,
    /// Milliseconds in argument 2.
    SecondMillis,
}

/// Every command that may keep Redis from answering, and its timeout.
const BLOCKING: &[(&str, BlockTimeout)] = &[
    ("blmove", BlockTimeout::LastSeconds),
    ("blmpop", BlockTimeout::FirstSeconds),
    ("blpop", BlockTimeout::LastSeconds),
    ("brpop", BlockTimeout::LastSeconds),
    ("brpoplpush", BlockTimeout::LastSeconds),
    ("bzmpop", BlockTimeout::FirstSeconds),
    ("bzpopmax", BlockTimeout::LastSeconds),
    ("bzpopmin", BlockTimeout::LastSeconds),
    ("wait", BlockTimeout::SecondMillis),
    ("xread", BlockTimeout::BlockOptionMillis),
    ("xreadgroup", BlockTimeout::BlockOptionMillis),
];

/// How long the command in `args` may block. A timeout that does not parse
/// makes Redis answer with an error at once.
pub fn blocks(row: Option<&Row>, args: &[Bytes]) -> Blocks {
    let Some(row) = row else { return Blocks::No };
    let Some((_, timeout)) = BLOCKING.iter().find(|(name, _)| *name == row.name) else {
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
        BlockTimeout::LastSeconds => number(args.last()),
        BlockTimeout::FirstSeconds => number(args.get(1)),
        BlockTimeout::SecondMillis => number(args.get(2)).map(|ms| ms / 1000.0),
        BlockTimeout::BlockOptionMillis => {
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
    /// Anything else a connection remembers (MULTI, WATCH, subscriptions,
    /// tracking, names, protocol, cluster flags) or may remember (commands
    /// without a row, DEBUG): only RESET and AUTH undo it.
    Session,
}

/// Rows outside [`Class::Connection`] that still change the connection.
const CHANGE_THE_CONNECTION: &[&str] = &[
    "asking",
    "debug",
    "readonly",
    "readwrite",
    "unwatch",
    "watch",
];

/// What forwarding a command with this row (`None`: no row) leaves behind.
pub fn leaves(row: Option<&Row>) -> Leaves {
    match row {
        None => Leaves::Session,
        Some(row) if row.name == "select" => Leaves::Database,
        Some(Row {
            class: Class::Connection(_),
            ..
        }) => Leaves::Session,
        Some(row) if CHANGE_THE_CONNECTION.contains(&row.name) => Leaves::Session,
        Some(_) => Leaves::Nothing,
    }
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
    match COMMANDS.binary_search_by(|row| row.name.as_bytes().cmp(lower)) {
        Ok(i) => (CommandId(i as u16), Some(&COMMANDS[i])),
        Err(_) => (CommandId::OTHER, None),
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
            Keys::WithStore => {
                let mut keys = if len > 1 { vec![1] } else { Vec::new() };
                for (i, arg) in args.iter().enumerate().skip(2) {
                    if (arg.eq_ignore_ascii_case(b"store")
                        || arg.eq_ignore_ascii_case(b"storedist"))
                        && i + 1 < len
                    {
                        keys.push(i + 1);
                    }
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
    }

    #[test]
    fn lookup_ignores_case_and_rejects_unknown_names() {
        assert_eq!(lookup(b"AuTh").map(|r| r.name), Some("auth"));
        assert_eq!(
            lookup(b"GET").map(|r| r.class),
            Some(Class::Value(ValueCommand::Get))
        );
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
        for (name, _) in BLOCKING {
            assert!(lookup(name.as_bytes()).is_some(), "{name} has no row");
        }
    }

    #[test]
    fn only_plain_data_commands_leave_nothing_on_the_connection() {
        for name in CHANGE_THE_CONNECTION {
            assert!(lookup(name.as_bytes()).is_some(), "{name} has no row");
        }
        for row in COMMANDS {
            let leaves = leaves(Some(row));
            match row.class {
                Class::Connection(_) => assert_eq!(leaves, Leaves::Session, "{}", row.name),
                _ if CHANGE_THE_CONNECTION.contains(&row.name) => {
                    assert_eq!(leaves, Leaves::Session)
                }
                _ if row.name == "select" => assert_eq!(leaves, Leaves::Database),
                _ => assert_eq!(leaves, Leaves::Nothing, "{}", row.name),
            }
        }
        assert_eq!(leaves(lookup(b"SET")), Leaves::Nothing);
        assert_eq!(leaves(lookup(b"Client")), Leaves::Session);
        assert_eq!(leaves(lookup(b"WATCH")), Leaves::Session);
        assert_eq!(leaves(None), Leaves::Session);
    }
}
