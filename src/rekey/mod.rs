//! `redcloak rekey`: re-encrypts what Redis holds under one key, so an old
//! key can be retired. It reuses redcloak's configuration (the rules, the
//! keyring, the upstream TLS and login) and talks to Redis directly, as
//! redcloak's own ACL user.
//!
//! ```text
//!   SCAN (MATCH) ─▶ TYPE ─▶ string: GET      ─▶ open (old key) ─▶ seal (target) ─▶ compare-and-swap
//!                           hash:   HSCAN    ─▶   per field, the same
//!                           list:   LRANGE   ─▶   per element (LINDEX, LSET)
//!                           set:    SSCAN    ─▶   per member (SADD new, SREM old)
//!                           zset:   ZSCAN    ─▶   per member (ZADD new with its score, ZREM old)
//! ```
//!
//! Every rewrite is a compare-and-swap: a script replaces the value only if
//! it still holds the exact bytes that were read (`SET ... KEEPTTL`, so the
//! TTL stays; `HSET` keeps the key's TTL). A value the app changed meanwhile
//! is read again, at most 3 times, then counted as skipped. A value that
//! does not open is counted, named only where `logging.log_key_names`
//! allows, and never rewritten. No value, plaintext or sealed, is logged.
//! The target key must be in the keyring (the primary by default), so
//! nothing is sealed under a key that is not stored. `--to-plaintext`
//! (with `--i-understand`) writes every value back in plaintext: the way
//! off redcloak.
//!
//! Strings, hashes, lists, sets and sorted sets are rewritten (members as
//! their rule seals them, deterministically where it says so). Stream
//! entries are counted per key id but never rewritten: Redis never changes
//! an entry (its ID is its identity, and consumer groups point at it), and
//! a copy would need new IDs. They leave the old key when the stream is
//! trimmed (`XTRIM ... MINID`), and until then `--verify` and
//! `keys retire` count them as remaining. HyperLogLogs hold keyed tokens,
//! not envelopes, and are left alone.

mod progress;

pub use progress::Progress;

use crate::config::Config;
use crate::crypto::envelope;
use crate::crypto::keyring::{Keyring, Opened};
use crate::crypto::{CurrentKeyring, OpenError};
use crate::policy::{Policy, ValueSite};
use crate::resp::{self, Limits};
use crate::upstream::{ReplyReader, Upstream, UpstreamStream};
use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use zeroize::Zeroizing;

/// Rewrites one string if it still holds what was read; keeps its TTL.
const STRING_CAS: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') return 1 end return 0";
/// Rewrites one hash field if it still holds what was read.
const HASH_CAS: &str = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then \
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) return 1 end return 0";
/// Rewrites one list element if the index still holds what was read.
const LIST_CAS: &str = "if redis.call('LINDEX', KEYS[1], ARGV[1]) == ARGV[2] then \
redis.call('LSET', KEYS[1], ARGV[1], ARGV[3]) return 1 end return 0";
/// Replaces one set member if it is still there (the new one first, so the
/// set is never empty in between and keeps its TTL).
const SET_CAS: &str = "if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then \
redis.call('SADD', KEYS[1], ARGV[2]) redis.call('SREM', KEYS[1], ARGV[1]) return 1 end return 0";
/// Replaces one sorted-set member, with its score, if it is still there.
const ZSET_CAS: &str = "local score = redis.call('ZSCORE', KEYS[1], ARGV[1]) if score then \
redis.call('ZADD', KEYS[1], score, ARGV[2]) redis.call('ZREM', KEYS[1], ARGV[1]) return 1 end return 0";
/// A HyperLogLog's representation starts with this (a string to Redis).
const HYPERLOGLOG: &[u8] = b"HYLL";
/// Reads again after a lost compare-and-swap at most this often.
const ATTEMPTS: usize = 3;
/// Keys asked of each SCAN (and fields of each HSCAN) at full speed; a
/// paced run asks fewer, so each page is a smaller burst.
const SCAN_COUNT: u32 = 200;

/// How fast the run goes: at most `--rate` values and `--rate-bytes` bytes
/// per second, both halved while a page's compare-and-swap round trip
/// exceeds `--max-latency`, and raised again by a tenth after each page
/// under half of it (up to what was asked).
struct Pace {
    values: Throttle,
    bytes: Throttle,
    max_latency: Option<Duration>,
}

/// One per-second limit of a [`Pace`].
struct Throttle {
    limit: Option<f64>,
    /// What was asked (`None`: as fast as Redis goes).
    ceiling: Option<f64>,
    /// Never halved below this.
    floor: f64,
    /// Without a ceiling, raised past this the limit is lifted.
    lifted_above: f64,
}

impl Throttle {
    fn new(asked: Option<u64>, floor: f64, lifted_above: f64) -> Throttle {
        let ceiling = asked.filter(|r| *r > 0).map(|r| r as f64);
        Throttle {
            limit: ceiling,
            ceiling,
            floor,
            lifted_above,
        }
    }

    /// Half of what the last page did (or of the limit, if lower).
    fn halve(&mut self, done: u64, took: Duration) {
        let speed = done as f64 / took.as_secs_f64().max(1e-3);
        let current = self.limit.unwrap_or(speed).min(speed.max(1.0));
        self.limit = Some((current / 2.0).max(self.floor));
    }

    fn raise(&mut self) {
        if let Some(limit) = self.limit {
            let raised = limit * 1.1;
            self.limit = match self.ceiling {
                Some(ceiling) => Some(raised.min(ceiling)),
                None if raised > self.lifted_above => None,
                None => Some(raised),
            };
        }
    }

    /// How long `done` takes at this limit.
    fn time_for(&self, done: u64) -> Duration {
        self.limit.map_or(Duration::ZERO, |limit| {
            Duration::from_secs_f64(done as f64 / limit)
        })
    }
}

impl Pace {
    fn new(options: &Options) -> Pace {
        Pace {
            values: Throttle::new(options.rate.map(u64::from), 100.0, 1e6),
            bytes: Throttle::new(options.rate_bytes, 64.0 * 1024.0, 1e10),
            max_latency: options.max_latency,
        }
    }

    /// Keys (or fields) to ask for per page: about 20 pages a second.
    fn page_size(&self) -> String {
        let size = self.values.limit.map_or(SCAN_COUNT, |limit| {
            ((limit / 20.0) as u32).clamp(10, SCAN_COUNT)
        });
        size.to_string()
    }

    /// After a page that rewrote `values` of `bytes` in `took`, its slowest
    /// compare-and-swap round trip `latency`: how long to wait.
    fn after_page(
        &mut self,
        values: u64,
        bytes: u64,
        took: Duration,
        latency: Duration,
    ) -> Duration {
        if let Some(bound) = self.max_latency {
            if latency > bound {
                self.values.halve(values, took);
                self.bytes.halve(bytes, took);
            } else if latency < bound / 2 {
                self.values.raise();
                self.bytes.raise();
            }
        }
        let needed = self.values.time_for(values).max(self.bytes.time_for(bytes));
        needed.saturating_sub(took)
    }
}

/// What the run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Rewrite what is under another key.
    Rewrite,
    /// Count only.
    Census,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Seal under this key id (`None`: the keyring's primary).
    pub to_key: Option<u32>,
    /// Write values back in plaintext instead of sealing them.
    pub to_plaintext: bool,
    /// Also seal plaintext values left from before encryption.
    pub seal_legacy: bool,
    /// Only keys matching this glob (SCAN MATCH).
    pub pattern: Option<String>,
    pub mode: Mode,
    /// Values larger than this are reported and left alone.
    pub max_value_bytes: usize,
    /// Where the run records its progress (written atomically every few
    /// seconds); an unfinished run there is resumed.
    pub checkpoint: Option<PathBuf>,
    /// At most this many values per second (`None`: as fast as Redis goes).
    pub rate: Option<u32>,
    /// At most this many bytes written per second.
    pub rate_bytes: Option<u64>,
    /// Halve the rate while a compare-and-swap round trip takes longer.
    pub max_latency: Option<Duration>,
    /// Stop after this many keys (a run in parts, resumed from the
    /// checkpoint).
    pub stop_after_keys: Option<u64>,
}

/// What a run found and did. Values are counted once each: a hash field
/// is a value.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Census {
    /// Values sealed under each key id, as found (before rewriting).
    pub by_key_id: BTreeMap<u32, u64>,
    /// Plaintext values where the rules encrypt.
    pub legacy_plaintext: u64,
    /// Values rewritten under the target key.
    pub rewritten: u64,
    /// Values the app changed under the run more often than it retried.
    pub skipped: u64,
    /// Values that did not open (tampered, or under a key not in the keyring).
    pub failed: u64,
    /// Values over `--max-value-bytes`.
    pub too_large: u64,
    /// Streams under a rule that encrypts (their entries are counted
    /// below, never rewritten).
    #[serde(default)]
    pub streams: u64,
    /// Stream entries' values sealed under each key id: they stay where
    /// they are until the stream is trimmed.
    #[serde(default)]
    pub stream_values_by_key_id: BTreeMap<u32, u64>,
    /// Stream entries' values in plaintext where the rules encrypt.
    #[serde(default)]
    pub stream_plaintext: u64,
    /// Bytes written by the rewrites.
    #[serde(default)]
    pub rewritten_bytes: u64,
    /// Key names of failed values, where `logging.log_key_names` allows.
    pub failed_keys: Vec<String>,
    /// Keys looked at.
    pub keys: u64,
    /// The run went over every key (not stopped part way).
    pub complete: bool,
}

impl Census {
    /// Values still sealed under any key (after `--to-plaintext`).
    pub fn remaining_sealed(&self) -> u64 {
        let sealed: u64 = self.by_key_id.values().sum();
        let in_streams: u64 = self.stream_values_by_key_id.values().sum();
        sealed.saturating_sub(self.rewritten) + in_streams
    }

    /// Values under `id`, stream entries included.
    pub fn under(&self, id: u32) -> u64 {
        let count = |by: &BTreeMap<u32, u64>| by.get(&id).copied().unwrap_or(0);
        count(&self.by_key_id) + count(&self.stream_values_by_key_id)
    }

    /// Values still under a key other than `target` (or in plaintext where
    /// the rules encrypt, when `seal_legacy`): `--verify` exits 0 only at 0.
    pub fn remaining(&self, target: u32, seal_legacy: bool) -> u64 {
        let others: u64 = self
            .by_key_id
            .iter()
            .filter(|(id, _)| **id != target)
            .map(|(_, n)| n)
            .sum();
        let others = others.saturating_sub(self.rewritten);
        let in_streams: u64 = self
            .stream_values_by_key_id
            .iter()
            .filter(|(id, _)| **id != target)
            .map(|(_, n)| n)
            .sum();
        others
            + in_streams
            + if seal_legacy {
                self.legacy_plaintext + self.stream_plaintext
            } else {
                0
            }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    #[error(
        "key {0} is not in the keyring: add it first, so nothing is sealed under a key that is not stored"
    )]
    UnknownTarget(u32),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error(transparent)]
    Keys(#[from] crate::kms::KeysError),
    #[error("Redis: {0}")]
    Redis(String),
    #[error(
        "the checkpoint {path} was written with another keyring or other options ({what}): \
         finish that run with them, or remove the file to start over"
    )]
    CheckpointMismatch { path: String, what: &'static str },
    #[error("checkpoint {path}: {error}")]
    Checkpoint { path: String, error: String },
}

/// What a checkpoint file holds: where the SCAN is, what was counted, and
/// what the run was (a resumed run must be the same run).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    cursor: String,
    census: Census,
    /// SHA-256 over the keyring's primary, key ids and check values.
    keyring: String,
    target: u32,
    #[serde(default)]
    to_plaintext: bool,
    pattern: Option<String>,
    seal_legacy: bool,
    mode: String,
}

/// How often a checkpoint is written.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

fn keyring_fingerprint(keyring: &Keyring) -> String {
    use sha2::{Digest, Sha256};
    let shape = keyring.shape();
    let mut hash = Sha256::new();
    hash.update(shape.primary.to_be_bytes());
    for (id, check) in &shape.checks {
        hash.update(id.to_be_bytes());
        hash.update(check);
    }
    crate::crypto::hex(&hash.finalize())
}

fn checkpoint_error(path: &std::path::Path, error: impl std::fmt::Display) -> RekeyError {
    RekeyError::Checkpoint {
        path: path.display().to_string(),
        error: error.to_string(),
    }
}

/// Writes `checkpoint` to `path` atomically (a temporary file renamed).
fn save(path: &std::path::Path, checkpoint: &Checkpoint) -> Result<(), RekeyError> {
    let text = serde_json::to_vec_pretty(checkpoint).map_err(|e| checkpoint_error(path, e))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| checkpoint_error(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| checkpoint_error(path, e))
}

/// One connection to Redis, requests sent in batches.
struct Conn {
    stream: UpstreamStream,
    replies: ReplyReader,
    timeout: Duration,
}

impl Conn {
    /// Sends every command, then reads one reply for each.
    async fn batch(&mut self, commands: &[Vec<Bytes>]) -> Result<Vec<BytesMut>, RekeyError> {
        let mut out = BytesMut::new();
        for command in commands {
            resp::encode_command(&mut out, command);
        }
        let limits = Limits {
            max_bulk_bytes: 512 * 1024 * 1024,
            max_reply_bytes: 1024 * 1024 * 1024,
            ..Limits::default()
        };
        let exchange = async {
            self.stream.write_all(&out).await?;
            self.stream.flush().await?;
            let mut replies = Vec::with_capacity(commands.len());
            for _ in commands {
                replies.push(self.replies.next(&mut self.stream, &limits).await?);
            }
            Ok::<_, std::io::Error>(replies)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(replies)) => Ok(replies),
            Ok(Err(err)) => Err(RekeyError::Redis(err.to_string())),
            Err(_) => Err(RekeyError::Redis("no answer in time".into())),
        }
    }
}

fn command(args: &[&[u8]]) -> Vec<Bytes> {
    args.iter().map(|a| Bytes::copy_from_slice(a)).collect()
}

/// A value read from Redis, where it sits, and what to write instead.
struct Rewrite {
    key: Bytes,
    place: Place,
    stored: Bytes,
    /// What replaces it: sealed under the target (plaintext for `--to-plaintext`).
    replacement: Bytes,
    attempts: usize,
}

/// Where in its key a value sits.
#[derive(Debug, Clone)]
enum Place {
    String,
    HashField(Bytes),
    ListIndex(i64),
    SetMember,
    SortedSetMember,
}

impl Place {
    fn kind(&self) -> envelope::Kind {
        match self {
            Place::String => envelope::Kind::String,
            Place::HashField(_) => envelope::Kind::HashField,
            Place::ListIndex(_) => envelope::Kind::ListElement,
            Place::SetMember => envelope::Kind::SetMember,
            Place::SortedSetMember => envelope::Kind::SortedSetMember,
        }
    }
}

/// The run: over every key (or those matching), census, and unless
/// counting only, rewrite.
pub async fn run(
    config: Config,
    options: &Options,
    progress: &mut Progress,
) -> Result<Census, RekeyError> {
    let log_key_names = config.log_key_names;
    let upstream = Upstream::from_config(&config.upstream)?;
    let keys = &config.encryption.keys;
    let keyring = keys.keyring(keys.startup_timeout(), None).await?;
    let keyring = CurrentKeyring::new(keyring);
    let policy = Policy::new(
        crate::auth::ClientAuth::new(None),
        crate::policy::rules::Rules::new(config.encryption.rules),
        keyring.clone(),
        config.encryption.unknown_commands,
    );
    let keyring = keyring.load_full();
    let target = options.to_key.unwrap_or(keyring.primary_id());
    if !options.to_plaintext && !keyring.has(target) {
        return Err(RekeyError::UnknownTarget(target));
    }
    let stream = upstream.connect().await?;
    let mut conn = Conn {
        stream,
        replies: ReplyReader::default(),
        timeout: config.upstream.request_timeout.max(Duration::from_secs(10)),
    };
    let run = Run {
        policy: &policy,
        keyring: &keyring,
        target,
        options,
        log_key_names,
    };
    let mut checkpoint = Checkpoint {
        cursor: "0".into(),
        census: Census::default(),
        keyring: keyring_fingerprint(&keyring),
        target,
        to_plaintext: options.to_plaintext,
        pattern: options.pattern.clone(),
        seal_legacy: options.seal_legacy,
        mode: format!("{:?}", options.mode),
    };
    if let Some(path) = &options.checkpoint
        && let Ok(text) = std::fs::read(path)
    {
        let earlier: Checkpoint =
            serde_json::from_slice(&text).map_err(|e| checkpoint_error(path, e))?;
        let mismatch = |what| RekeyError::CheckpointMismatch {
            path: path.display().to_string(),
            what,
        };
        if earlier.keyring != checkpoint.keyring {
            return Err(mismatch("keyring"));
        }
        let run = (earlier.target, earlier.to_plaintext, &earlier.pattern);
        let now = (target, options.to_plaintext, &options.pattern);
        if run != now
            || (earlier.seal_legacy, &earlier.mode) != (options.seal_legacy, &checkpoint.mode)
        {
            return Err(mismatch("target, --match, --seal-legacy or mode"));
        }
        // A finished run's file starts a new run; an unfinished one resumes.
        if !earlier.census.complete {
            checkpoint = earlier;
        }
    }
    let dbsize = conn.batch(&[command(&[b"DBSIZE"])]).await?.remove(0);
    let keys_in_database = resp::integer(&dbsize).map_or(0, |n| n.max(0) as u64);
    progress.start(keys_in_database, &checkpoint.census);
    let mut last_saved = std::time::Instant::now();
    let mut pace = Pace::new(options);
    loop {
        let page_started = std::time::Instant::now();
        let rewritten_before = checkpoint.census.rewritten;
        let bytes_before = checkpoint.census.rewritten_bytes;
        let cursor = checkpoint.cursor.clone();
        let count = pace.page_size();
        let mut scan = vec![b"SCAN".as_slice(), cursor.as_bytes()];
        if let Some(pattern) = &options.pattern {
            scan.extend([b"MATCH".as_slice(), pattern.as_bytes()]);
        }
        scan.extend([b"COUNT".as_slice(), count.as_bytes()]);
        let reply = conn.batch(&[command(&scan)]).await?.remove(0);
        let (next, keys) = scan_reply(&reply)?;
        let census = &mut checkpoint.census;
        let latency = run.page(&mut conn, &keys, count.as_bytes(), census).await?;
        census.keys += keys.len() as u64;
        checkpoint.cursor = String::from_utf8_lossy(&next).into_owned();
        let finished = &next[..] == b"0";
        checkpoint.census.complete = finished;
        let stopping = options
            .stop_after_keys
            .is_some_and(|limit| checkpoint.census.keys >= limit);
        if finished || stopping || last_saved.elapsed() >= CHECKPOINT_EVERY {
            if let Some(path) = &options.checkpoint {
                save(path, &checkpoint)?;
            }
            last_saved = std::time::Instant::now();
        }
        let rate = pace.values.limit.map(|l| l as u64);
        progress.page(&checkpoint.census, rate, finished || stopping);
        if finished || stopping {
            return Ok(checkpoint.census);
        }
        let values = checkpoint.census.rewritten - rewritten_before;
        let bytes = checkpoint.census.rewritten_bytes - bytes_before;
        let wait = pace.after_page(values, bytes, page_started.elapsed(), latency);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

struct Run<'a> {
    policy: &'a Policy,
    keyring: &'a Keyring,
    target: u32,
    options: &'a Options,
    log_key_names: bool,
}

impl Run<'_> {
    /// One SCAN page: each key's type, its values, the census, the
    /// rewrites. Returns the slowest compare-and-swap round trip.
    async fn page(
        &self,
        conn: &mut Conn,
        keys: &[Bytes],
        count: &[u8],
        census: &mut Census,
    ) -> Result<Duration, RekeyError> {
        if keys.is_empty() {
            return Ok(Duration::ZERO);
        }
        let types: Vec<Vec<Bytes>> = keys.iter().map(|k| command(&[b"TYPE", k])).collect();
        let types = conn.batch(&types).await?;
        let mut strings = Vec::new();
        let mut hashes = Vec::new();
        let mut lists = Vec::new();
        let mut sets = Vec::new();
        let mut zsets = Vec::new();
        let mut streams = Vec::new();
        for (key, kind) in keys.iter().zip(&types) {
            match &kind[..] {
                b"+string\r\n" => strings.push(key.clone()),
                b"+hash\r\n" => hashes.push(key.clone()),
                b"+list\r\n" => lists.push(key.clone()),
                b"+set\r\n" => sets.push(key.clone()),
                b"+zset\r\n" => zsets.push(key.clone()),
                // Under a rule that encrypts: its entries are counted.
                b"+stream\r\n"
                    if self
                        .policy
                        .site(envelope::Kind::StreamValue, key, None)
                        .is_some() =>
                {
                    streams.push(key.clone());
                }
                _ => {}
            }
        }
        let mut rewrites = Vec::new();
        let gets: Vec<Vec<Bytes>> = strings.iter().map(|k| command(&[b"GET", k])).collect();
        for (key, reply) in strings.iter().zip(conn.batch(&gets).await?) {
            if let Some(stored) = resp::bulk_body(&reply)
                && !stored.starts_with(HYPERLOGLOG)
            {
                let stored = Bytes::copy_from_slice(stored);
                if let Some(rewrite) = self.look_at(key, Place::String, stored, census) {
                    rewrites.push(rewrite);
                }
            }
        }
        for key in &hashes {
            let mut cursor = Bytes::from_static(b"0");
            loop {
                let hscan = command(&[b"HSCAN", key, &cursor, b"COUNT", count]);
                let reply = conn.batch(&[hscan]).await?.remove(0);
                let (next, pairs) = scan_reply(&reply)?;
                for pair in pairs.chunks_exact(2) {
                    let (field, stored) = (pair[0].clone(), pair[1].clone());
                    let place = Place::HashField(field);
                    if let Some(rewrite) = self.look_at(key, place, stored, census) {
                        rewrites.push(rewrite);
                    }
                }
                if &next[..] == b"0" {
                    break;
                }
                cursor = next;
            }
        }
        let step = std::str::from_utf8(count)
            .ok()
            .and_then(|c| c.parse::<i64>().ok())
            .unwrap_or(200);
        for key in &lists {
            let mut start = 0i64;
            loop {
                let (first, last) = (start.to_string(), (start + step - 1).to_string());
                let range = command(&[b"LRANGE", key, first.as_bytes(), last.as_bytes()]);
                let reply = conn.batch(&[range]).await?.remove(0);
                let elements = array_items(&reply)?;
                for (i, stored) in elements.iter().enumerate() {
                    let place = Place::ListIndex(start + i as i64);
                    if let Some(rewrite) = self.look_at(key, place, stored.clone(), census) {
                        rewrites.push(rewrite);
                    }
                }
                if (elements.len() as i64) < step {
                    break;
                }
                start += step;
            }
        }
        for (keys, scan, place, pairs) in [
            (&sets, &b"SSCAN"[..], Place::SetMember, false),
            (&zsets, &b"ZSCAN"[..], Place::SortedSetMember, true),
        ] {
            for key in keys {
                let mut cursor = Bytes::from_static(b"0");
                loop {
                    let request = command(&[scan, key, &cursor, b"COUNT", count]);
                    let reply = conn.batch(&[request]).await?.remove(0);
                    let (next, items) = scan_reply(&reply)?;
                    let members = items.iter().step_by(if pairs { 2 } else { 1 });
                    for member in members {
                        let rewrite = self.look_at(key, place.clone(), member.clone(), census);
                        rewrites.extend(rewrite);
                    }
                    if &next[..] == b"0" {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        for key in &streams {
            census.streams += 1;
            count_stream(conn, key, count, census).await?;
        }
        if self.options.mode == Mode::Rewrite {
            return self.rewrite(conn, rewrites, census).await;
        }
        Ok(Duration::ZERO)
    }

    /// Counts one value, and says how to rewrite it when it is under
    /// another key (or plaintext to seal).
    fn look_at(
        &self,
        key: &Bytes,
        place: Place,
        stored: Bytes,
        census: &mut Census,
    ) -> Option<Rewrite> {
        let field = match &place {
            Place::HashField(field) => Some(field),
            _ => None,
        };
        // A plaintext rule: nothing to do.
        let site = self.policy.site(place.kind(), key, field)?;
        if stored.len() > self.options.max_value_bytes {
            census.too_large += 1;
            return None;
        }
        let plaintext = match envelope::key_id(&stored) {
            Ok(id) => {
                *census.by_key_id.entry(id).or_default() += 1;
                if id == self.target && !self.options.to_plaintext {
                    return None;
                }
                match self.keyring.open(&stored, site.binding()) {
                    Ok(Opened::Plaintext(plaintext)) => Zeroizing::new(plaintext),
                    Ok(Opened::Legacy(_)) | Err(_) => {
                        self.failed(&site, census);
                        return None;
                    }
                }
            }
            Err(OpenError::NotAnEnvelope) => {
                census.legacy_plaintext += 1;
                if !self.options.seal_legacy || self.options.to_plaintext {
                    return None;
                }
                Zeroizing::new(stored.to_vec())
            }
            Err(_) => {
                self.failed(&site, census);
                return None;
            }
        };
        let replacement = if self.options.to_plaintext {
            plaintext.to_vec()
        } else if site.deterministic {
            self.keyring
                .seal_member_with(self.target, &plaintext, site.binding())?
        } else {
            self.keyring
                .seal_with(self.target, &plaintext, site.binding())?
        };
        Some(Rewrite {
            key: key.clone(),
            place,
            stored,
            replacement: Bytes::from(replacement),
            attempts: 0,
        })
    }

    fn failed(&self, site: &ValueSite, census: &mut Census) {
        census.failed += 1;
        if self.log_key_names {
            census
                .failed_keys
                .push(crate::policy::shown(&site.key).to_string());
        }
    }

    /// Compare-and-swap each rewrite; one the app changed meanwhile is read
    /// and sealed again, at most [`ATTEMPTS`] times.
    async fn rewrite(
        &self,
        conn: &mut Conn,
        mut rewrites: Vec<Rewrite>,
        census: &mut Census,
    ) -> Result<Duration, RekeyError> {
        let mut slowest = Duration::ZERO;
        while !rewrites.is_empty() {
            let swaps: Vec<Vec<Bytes>> = rewrites.iter().map(swap).collect();
            let sent = std::time::Instant::now();
            let replies = conn.batch(&swaps).await?;
            slowest = slowest.max(sent.elapsed());
            let mut lost = Vec::new();
            for (rewrite, reply) in rewrites.into_iter().zip(replies) {
                match &reply[..] {
                    b":1\r\n" => {
                        census.rewritten += 1;
                        census.rewritten_bytes += rewrite.replacement.len() as u64;
                    }
                    b":0\r\n" => lost.push(rewrite),
                    other => {
                        return Err(RekeyError::Redis(crate::upstream::error_text(other)));
                    }
                }
            }
            rewrites = Vec::new();
            for mut rewrite in lost {
                rewrite.attempts += 1;
                if rewrite.attempts >= ATTEMPTS {
                    census.skipped += 1;
                    continue;
                }
                // Read again: the app's value is what gets resealed. A
                // member no longer there was removed or replaced by the app.
                let read = match &rewrite.place {
                    Place::HashField(field) => command(&[b"HGET", &rewrite.key, field]),
                    Place::String => command(&[b"GET", &rewrite.key]),
                    Place::ListIndex(i) => {
                        command(&[b"LINDEX", &rewrite.key, i.to_string().as_bytes()])
                    }
                    Place::SetMember | Place::SortedSetMember => continue,
                };
                let reply = conn.batch(&[read]).await?.remove(0);
                let Some(stored) = resp::bulk_body(&reply) else {
                    // Deleted meanwhile: nothing to rewrite.
                    continue;
                };
                let stored = Bytes::copy_from_slice(stored);
                let mut scratch = Census::default();
                let attempts = rewrite.attempts;
                if let Some(mut again) =
                    self.look_at(&rewrite.key, rewrite.place.clone(), stored, &mut scratch)
                {
                    again.attempts = attempts;
                    rewrites.push(again);
                }
                census.failed += scratch.failed;
                census.failed_keys.extend(scratch.failed_keys);
            }
        }
        Ok(slowest)
    }
}

/// Counts a stream's entries' values per key id, a page of entries at a
/// time (`XRANGE key (last + COUNT n`).
async fn count_stream(
    conn: &mut Conn,
    key: &Bytes,
    count: &[u8],
    census: &mut Census,
) -> Result<(), RekeyError> {
    let mut start = Bytes::from_static(b"-");
    loop {
        let range = command(&[b"XRANGE", key, &start, b"+", b"COUNT", count]);
        let reply = conn.batch(&[range]).await?.remove(0);
        let invalid = || not_a("an XRANGE reply", &reply);
        let (_, entries) = resp::aggregate_elements(&reply, &unbounded()).ok_or_else(invalid)?;
        let mut last = None;
        for entry in &entries {
            let (_, parts) = resp::aggregate_elements(entry, &unbounded()).ok_or_else(invalid)?;
            let [id, fields] = parts[..] else {
                return Err(invalid());
            };
            last = Some(resp::bulk_body(id).ok_or_else(invalid)?.to_vec());
            for value in array_items(fields)?.iter().skip(1).step_by(2) {
                match envelope::key_id(value) {
                    Ok(id) => *census.stream_values_by_key_id.entry(id).or_default() += 1,
                    Err(OpenError::NotAnEnvelope) => census.stream_plaintext += 1,
                    Err(_) => census.failed += 1,
                }
            }
        }
        let Some(last) = last else {
            return Ok(());
        };
        let mut next = b"(".to_vec();
        next.extend_from_slice(&last);
        start = Bytes::from(next);
    }
}

/// The compare-and-swap script call for one rewrite.
fn swap(rewrite: &Rewrite) -> Vec<Bytes> {
    let (script, at) = match &rewrite.place {
        Place::String => (STRING_CAS, None),
        Place::HashField(field) => (HASH_CAS, Some(field.clone())),
        Place::ListIndex(i) => (LIST_CAS, Some(Bytes::from(i.to_string()))),
        Place::SetMember => (SET_CAS, None),
        Place::SortedSetMember => (ZSET_CAS, None),
    };
    let mut call = vec![
        Bytes::from_static(b"EVAL"),
        Bytes::from_static(script.as_bytes()),
        Bytes::from_static(b"1"),
        rewrite.key.clone(),
    ];
    call.extend(at);
    call.push(rewrite.stored.clone());
    call.push(rewrite.replacement.clone());
    call
}

/// Reading a reply already read whole: Redis bounded it, not this.
fn unbounded() -> Limits {
    Limits {
        max_bulk_bytes: usize::MAX / 4,
        max_reply_bytes: usize::MAX / 4,
        ..Limits::default()
    }
}

fn not_a(what: &str, reply: &[u8]) -> RekeyError {
    RekeyError::Redis(format!(
        "not {what}: {}",
        crate::upstream::error_text(reply)
    ))
}

/// The bulk strings of an array reply (LRANGE, a SCAN's elements).
fn array_items(reply: &[u8]) -> Result<Vec<Bytes>, RekeyError> {
    let (_, items) =
        resp::aggregate_elements(reply, &unbounded()).ok_or_else(|| not_a("an array", reply))?;
    items
        .iter()
        .map(|item| resp::bulk_body(item).map(Bytes::copy_from_slice))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| not_a("an array of strings", reply))
}

/// A SCAN (HSCAN, SSCAN, ZSCAN) reply: the next cursor and the elements.
fn scan_reply(reply: &[u8]) -> Result<(Bytes, Vec<Bytes>), RekeyError> {
    let invalid = || not_a("a SCAN reply", reply);
    let (_, parts) = resp::aggregate_elements(reply, &unbounded()).ok_or_else(invalid)?;
    let [cursor, elements] = parts[..] else {
        return Err(invalid());
    };
    let cursor = Bytes::copy_from_slice(resp::bulk_body(cursor).ok_or_else(invalid)?);
    Ok((cursor, array_items(elements)?))
}

/// The command that reverses a run: sealing back under `from`, the key
/// most values were under before it.
pub fn reverse_command(config_path: &std::path::Path, from: u32, options: &Options) -> String {
    let mut text = format!(
        "redcloak rekey --config {} --to-key {from}",
        config_path.display()
    );
    if let Some(pattern) = &options.pattern {
        text.push_str(&format!(" --match '{pattern}'"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(rate: Option<u32>, max_latency_ms: Option<u64>) -> Options {
        Options {
            to_key: None,
            to_plaintext: false,
            seal_legacy: false,
            pattern: None,
            mode: Mode::Rewrite,
            max_value_bytes: 1 << 20,
            checkpoint: None,
            rate,
            rate_bytes: None,
            max_latency: max_latency_ms.map(Duration::from_millis),
            stop_after_keys: None,
        }
    }

    #[test]
    fn an_unpaced_run_never_waits_and_asks_full_pages() {
        let mut pace = Pace::new(&options(None, None));
        assert_eq!(pace.page_size(), "200");
        let wait = pace.after_page(
            200,
            1 << 20,
            Duration::from_millis(1),
            Duration::from_millis(50),
        );
        assert_eq!(wait, Duration::ZERO);
    }

    #[test]
    fn a_rate_spreads_small_pages_over_time() {
        let mut pace = Pace::new(&options(Some(1000), None));
        assert_eq!(pace.page_size(), "50", "about 20 pages a second");
        let wait = pace.after_page(50, 5_000, Duration::from_millis(10), Duration::ZERO);
        assert_eq!(wait, Duration::from_millis(40));
    }

    #[test]
    fn a_byte_rate_spreads_large_values_over_time() {
        let mut paced = options(Some(1000), None);
        paced.rate_bytes = Some(1 << 20);
        let mut pace = Pace::new(&paced);
        // 50 values of 64 KiB: 3.125 MiB at 1 MiB/s is 3.125 s, longer than
        // the 50 ms that 50 values take at 1000/s.
        let wait = pace.after_page(50, 50 << 16, Duration::from_millis(125), Duration::ZERO);
        assert_eq!(wait, Duration::from_secs(3));
        // Small values: the value rate is what holds them back.
        let wait = pace.after_page(50, 50 * 64, Duration::from_millis(10), Duration::ZERO);
        assert_eq!(wait, Duration::from_millis(40));
    }

    #[test]
    fn slow_swaps_halve_the_rate_and_fast_ones_raise_it_back_to_the_ceiling() {
        let mut pace = Pace::new(&options(Some(10_000), Some(5)));
        let slow = Duration::from_millis(10);
        pace.after_page(200, 0, Duration::from_millis(20), slow);
        assert_eq!(pace.values.limit, Some(5_000.0));
        pace.after_page(100, 0, Duration::from_millis(20), slow);
        assert_eq!(pace.values.limit, Some(2_500.0));
        for _ in 0..20 {
            pace.after_page(100, 0, Duration::from_millis(1), Duration::from_millis(1));
        }
        assert_eq!(pace.values.limit, Some(10_000.0), "never above --rate");
        // Without --rate, the first slow page sets one from the speed seen,
        // for bytes too.
        let mut pace = Pace::new(&options(None, Some(5)));
        pace.after_page(1_000, 10 << 20, Duration::from_millis(100), slow);
        assert_eq!(pace.values.limit, Some(5_000.0));
        assert_eq!(pace.bytes.limit, Some(50.0 * 1024.0 * 1024.0));
        assert_eq!(pace.page_size(), "200");
    }
}
