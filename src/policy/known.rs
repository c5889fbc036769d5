//! Known Lua scripts: scripts whose effect on values redcloak knows, by the
//! SHA-1 of their exact body, so they can run on encrypted keys.
//!
//! A proved script (see `script`) touches only the keys it declares, but
//! Redis reads and writes the values it is given, so on its own it runs only
//! on plaintext keys. A known script's entry also says what each `KEYS[n]`
//! holds and which `ARGV` positions are values stored under which key, and
//! whether the reply is such values: redcloak then seals those arguments and
//! opens the reply, as it does for commands. An entry may instead say the
//! script can never run on encrypted keys and why (it compares or builds
//! stored values inside Lua); its refusal names the plaintext rule to add.
//!
//! Entries ship with redcloak (taken verbatim from the frameworks' released
//! versions) and come from `[[scripts]]` in the configuration. Every body,
//! shipped or configured, passes the prover (a test checks the shipped
//! ones): the registry never lets a script touch a key it does not declare.

use super::script::{self, Unproven};
use super::table::Kind;
use std::collections::HashMap;

/// What one `KEYS[n]` of a known script holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holds {
    String,
    List,
    Set,
    SortedSet,
}

impl Holds {
    /// The kind of the values stored under such a key.
    pub fn kind(self) -> Kind {
        match self {
            Holds::String => Kind::String,
            Holds::List => Kind::ListElement,
            Holds::Set => Kind::SetMember,
            Holds::SortedSet => Kind::SortedSetMember,
        }
    }

    fn parse(text: &str) -> Option<Holds> {
        Some(match text {
            "string" => Holds::String,
            "list" => Holds::List,
            "set" => Holds::Set,
            "sorted-set" => Holds::SortedSet,
            _ => return None,
        })
    }
}

/// One `ARGV` position, or the reply: plain, or values stored under
/// `KEYS[n]` (1-based, as in Lua).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Plain,
    ValuesOf(usize),
}

impl Role {
    fn parse(text: &str, keys: usize) -> Option<Role> {
        if text == "plain" {
            return Some(Role::Plain);
        }
        let n: usize = text
            .strip_prefix("KEYS[")?
            .strip_suffix(']')?
            .parse()
            .ok()?;
        (1..=keys).contains(&n).then_some(Role::ValuesOf(n))
    }
}

/// What redcloak does with a known script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Use {
    /// Runs on encrypted keys: seal the arguments, open the reply as said.
    Serve {
        keys: Vec<Holds>,
        args: Vec<Role>,
        reply: Role,
    },
    /// Runs on plaintext keys only; on encrypted keys it is refused with
    /// this reason (which names the rule to add).
    PlaintextOnly(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownScript {
    pub name: String,
    pub usage: Use,
}

/// A `[[scripts]]` entry as configured, before it is checked.
#[derive(Debug, Clone)]
pub struct ScriptEntry {
    pub name: String,
    pub body: String,
    pub keys: Vec<String>,
    pub args: Vec<String>,
    pub reply: String,
}

/// Known scripts by the SHA-1 of their body.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    by_sha: HashMap<[u8; 20], KnownScript>,
}

/// Huey's schedule pop (huey/storage.py, SCHEDULE_POP_LUA, 2.x and 3.x):
/// reads and removes the tasks due from the schedule sorted set.
const HUEY_SCHEDULE_POP: &str = "\
local unix_ts = tonumber(ARGV[1])
local res = redis.call('zrangebyscore', KEYS[1], '-inf', unix_ts)
if #res and redis.call('zremrangebyscore', KEYS[1], '-inf', unix_ts) == #res then
    return res
end";

/// Sidekiq's scheduler (lib/sidekiq/scheduled.rb, LUA_ZPOPBYSCORE, 6.x as
/// Debian ships it): pops the first due job of the schedule or retry set.
/// Ruby's `<<~LUA` strips the common indentation and keeps the last newline.
const SIDEKIQ_ZPOPBYSCORE: &str = "\
local key, now = KEYS[1], ARGV[1]
local jobs = redis.call(\"zrangebyscore\", key, \"-inf\", now, \"limit\", 0, 1)
if jobs[1] then
  redis.call(\"zrem\", key, jobs[1])
  return jobs[1]
end
";

/// kombu's binding refresh (kombu/transport/redis.py, REFRESH_BINDING,
/// 5.6+): adds a binding to an exchange's table and pushes its deadline.
const KOMBU_REFRESH_BINDING: &str = "
redis.call('SADD', KEYS[1], ARGV[1])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[2], 'GT', ms + tonumber(ARGV[3]), ARGV[2])
";

const REDIS_PY_LOCK: &str = "redis-py's Lock compares the token stored under the lock's key \
inside Lua, and an encrypted token never equals the one the client holds. Lock tokens are \
random, not data: give the lock's key a plaintext rule ([[encryption.rules]] pattern = \
\"<the lock name>\", mode = \"plaintext\")";

/// redis-py's Lock (redis/lock.py, 4.x to 8.x): release, extend, reacquire.
const REDIS_PY_LOCK_RELEASE: &str = "
        local token = redis.call('get', KEYS[1])
        if not token or token ~= ARGV[1] then
            return 0
        end
        redis.call('del', KEYS[1])
        return 1
    ";
const REDIS_PY_LOCK_EXTEND: &str = "
        local token = redis.call('get', KEYS[1])
        if not token or token ~= ARGV[1] then
            return 0
        end
        local expiration = redis.call('pttl', KEYS[1])
        if not expiration then
            expiration = 0
        end
        if expiration < 0 then
            return 0
        end

        local newttl = ARGV[2]
        if ARGV[3] == \"0\" then
            newttl = ARGV[2] + expiration
        end
        redis.call('pexpire', KEYS[1], newttl)
        return 1
    ";
const REDIS_PY_LOCK_REACQUIRE: &str = "
        local token = redis.call('get', KEYS[1])
        if not token or token ~= ARGV[1] then
            return 0
        end
        redis.call('pexpire', KEYS[1], ARGV[2])
        return 1
    ";

/// Why a `[[scripts]]` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("script '{0}': {1}")]
    Invalid(String, String),
}

impl Registry {
    /// The entries shipped with redcloak.
    pub fn builtin() -> Registry {
        let mut registry = Registry::default();
        let pop = |name: &str| KnownScript {
            name: name.into(),
            usage: Use::Serve {
                keys: vec![Holds::SortedSet],
                args: vec![Role::Plain],
                reply: Role::ValuesOf(1),
            },
        };
        registry.add(HUEY_SCHEDULE_POP, pop("huey schedule pop"));
        registry.add(SIDEKIQ_ZPOPBYSCORE, pop("sidekiq zpopbyscore"));
        let refresh = KnownScript {
            name: "kombu refresh binding".into(),
            usage: Use::Serve {
                keys: vec![Holds::Set, Holds::SortedSet],
                args: vec![Role::ValuesOf(1), Role::ValuesOf(2), Role::Plain],
                reply: Role::Plain,
            },
        };
        registry.add(KOMBU_REFRESH_BINDING, refresh);
        for (name, body) in [
            ("redis-py Lock release", REDIS_PY_LOCK_RELEASE),
            ("redis-py Lock extend", REDIS_PY_LOCK_EXTEND),
            ("redis-py Lock reacquire", REDIS_PY_LOCK_REACQUIRE),
        ] {
            let lock = KnownScript {
                name: name.into(),
                usage: Use::PlaintextOnly(REDIS_PY_LOCK.into()),
            };
            registry.add(body, lock);
        }
        registry
    }

    fn add(&mut self, body: &str, script: KnownScript) {
        self.by_sha.insert(script::sha1(body.as_bytes()), script);
    }

    /// Adds configured entries, each checked: its body proved, its roles
    /// well formed.
    pub fn with_entries(mut self, entries: Vec<ScriptEntry>) -> Result<Registry, EntryError> {
        for entry in entries {
            let invalid = |reason: String| EntryError::Invalid(entry.name.clone(), reason);
            script::prove_script(entry.body.as_bytes())
                .map_err(|Unproven(reason)| invalid(format!("its body is not proved: {reason}")))?;
            let keys = entry
                .keys
                .iter()
                .map(|k| {
                    Holds::parse(k).ok_or_else(|| {
                        invalid(format!(
                            "keys: unknown '{k}' (string, list, set, sorted-set)"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let role = |text: &str| {
                Role::parse(text, keys.len()).ok_or_else(|| {
                    invalid(format!(
                        "'{text}' is neither \"plain\" nor KEYS[1..{}]",
                        keys.len()
                    ))
                })
            };
            let args = entry
                .args
                .iter()
                .map(|a| role(a))
                .collect::<Result<Vec<_>, _>>()?;
            let reply = role(&entry.reply)?;
            let known = KnownScript {
                name: entry.name.clone(),
                usage: Use::Serve { keys, args, reply },
            };
            self.add(&entry.body, known);
        }
        Ok(self)
    }

    /// The entry for a script body's SHA-1.
    pub fn get(&self, sha: &[u8; 20]) -> Option<&KnownScript> {
        self.by_sha.get(sha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_bodies_are_proved_and_keyed_by_their_sha1() {
        let registry = Registry::builtin();
        for body in [
            HUEY_SCHEDULE_POP,
            SIDEKIQ_ZPOPBYSCORE,
            KOMBU_REFRESH_BINDING,
            REDIS_PY_LOCK_RELEASE,
            REDIS_PY_LOCK_EXTEND,
            REDIS_PY_LOCK_REACQUIRE,
        ] {
            assert_eq!(script::prove_script(body.as_bytes()), Ok(()));
            assert!(registry.get(&script::sha1(body.as_bytes())).is_some());
        }
        // The SHA-1 redis-py computes for Huey's body (its EVALSHA).
        assert_eq!(
            script::sha1(HUEY_SCHEDULE_POP.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .len(),
            40
        );
    }

    #[test]
    fn configured_entries_are_checked() {
        let entry = |body: &str, keys: &[&str], args: &[&str], reply: &str| ScriptEntry {
            name: "app pop".into(),
            body: body.into(),
            keys: keys.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            reply: reply.into(),
        };
        let pop = "return redis.call('LPOP', KEYS[1])";
        let registry = Registry::default()
            .with_entries(vec![entry(pop, &["list"], &[], "KEYS[1]")])
            .expect("a valid entry");
        assert_eq!(
            registry
                .get(&script::sha1(pop.as_bytes()))
                .map(|k| &k.usage),
            Some(&Use::Serve {
                keys: vec![Holds::List],
                args: vec![],
                reply: Role::ValuesOf(1)
            })
        );
        for (bad, why) in [
            (
                entry(
                    "return redis.call('GET', ARGV[1])",
                    &["string"],
                    &[],
                    "plain",
                ),
                "not proved",
            ),
            (entry(pop, &["hash"], &[], "plain"), "unknown 'hash'"),
            (entry(pop, &["list"], &["KEYS[2]"], "plain"), "KEYS[1..1]"),
            (entry(pop, &["list"], &[], "KEYS[0]"), "KEYS[1..1]"),
        ] {
            let err = Registry::default().with_entries(vec![bad]).expect_err(why);
            assert!(err.to_string().contains(why), "{err}");
        }
    }
}
