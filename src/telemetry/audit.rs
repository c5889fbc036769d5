//! The tamper-evident audit log (`[audit] file`): every security event
//! (and the key operations a reload applies) as a JSON line, each carrying
//! an HMAC chained to the line before, under a chain key ratcheted forward
//! after each line and the old one wiped. Someone who takes the running
//! process learns only the current chain key: the lines already written
//! cannot be rewritten without it showing.
//!
//! - **Segments.** Each start of the process begins a segment: a
//!   `segment_start` line naming the previous segment's last MAC, under a
//!   chain key derived from `[audit] key_file` (a random nonce in the line),
//!   after which the key file's contents are wiped from memory. Rotation
//!   (past `rotate_bytes`) renames the file and goes on with the same chain.
//! - **Truncation.** A checkpoint (segment, seq, MAC) goes to the normal log
//!   every `checkpoint_every` and at exit (`redcloak::audit` target): the
//!   audit file must still hold it (`redcloak audit verify --checkpoint`).
//! - **Never blocking.** Events are handed to a writer thread through a
//!   bounded queue; when it is full, or the disk refuses a line, the entry
//!   is dropped and counted (`redcloak_audit_entries_dropped_total`) and the
//!   chain does not advance (a line that failed is cut off again).
//!
//! A line: `{"segment":S,"seq":N,"ts":"...","event":"...","fields":{...},"mac":"<hex>"}`;
//! its MAC is HMAC-SHA256(K_N, previous MAC | the line up to `,"mac":`),
//! and K_{N+1} = HMAC-SHA256(K_N, "ratchet").

use crate::crypto::hex;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Entries waiting for the writer at most; past it they are dropped.
const QUEUED_ENTRIES: usize = 4096;
/// The tracing target of checkpoints (not itself audited).
pub const CHECKPOINT_TARGET: &str = "redcloak::audit";
const MAC_SUFFIX: &str = ",\"mac\":\"";

type HmacSha256 = Hmac<Sha256>;

/// Entries dropped (queue full, or the disk refused them).
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Where security events go, once `[audit]` is configured.
static SINK: OnceLock<SyncSender<Message>> = OnceLock::new();

/// What the writer is handed.
enum Message {
    Entry(Entry),
    /// Write a checkpoint now (the process is ending), then say so.
    Finish(SyncSender<()>),
}

pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// `[audit]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub file: PathBuf,
    pub key_file: PathBuf,
    pub rotate_bytes: u64,
    pub checkpoint_every: Duration,
}

/// One event to record.
#[derive(Debug)]
pub struct Entry {
    pub event: String,
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// Hands an event to the writer without waiting; counted when dropped.
/// Nothing happens without `[audit]`.
pub fn record(entry: Entry) {
    if let Some(sink) = SINK.get() {
        match sink.try_send(Message::Entry(entry)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The chain: its key (wiped as it moves on), the last MAC, where it is.
pub struct Chain {
    key: Zeroizing<[u8; 32]>,
    pub previous_mac: [u8; 32],
    pub segment: u64,
    /// The seq of the next line.
    pub seq: u64,
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The chain key a segment starts with.
fn segment_key(master: &[u8], segment: u64, nonce: &[u8; 16]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(hmac(
        master,
        &[b"redcloak-audit-v1\0", &segment.to_be_bytes(), nonce],
    ))
}

impl Chain {
    /// A new segment after `previous` (segment, last MAC), and its first
    /// line (to [`Chain::advance`] past once written).
    pub fn start(master: &[u8], previous: Option<(u64, [u8; 32])>, now: &str) -> (Chain, String) {
        let mut nonce = [0u8; 16];
        crate::crypto::envelope::fill_random(&mut nonce);
        let (segment, previous_mac) = match previous {
            Some((segment, mac)) => (segment + 1, mac),
            None => (0, [0u8; 32]),
        };
        let chain = Chain {
            key: segment_key(master, segment, &nonce),
            previous_mac,
            segment,
            seq: 0,
        };
        let mut fields = serde_json::Map::new();
        fields.insert("nonce".into(), hex(&nonce).into());
        fields.insert("previous_mac".into(), hex(&previous_mac).into());
        let line = chain.line(now, "segment_start", &fields);
        (chain, line)
    }

    /// The next line for an event (the chain does not move until
    /// [`Chain::advance`]: a line that is not written leaves no gap).
    pub fn line(
        &self,
        now: &str,
        event: &str,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> String {
        let body = format!(
            "{{\"segment\":{},\"seq\":{},\"ts\":{},\"event\":{},\"fields\":{}",
            self.segment,
            self.seq,
            serde_json::Value::from(now),
            serde_json::Value::from(event),
            serde_json::Value::Object(fields.clone()),
        );
        let mac = hmac(&self.key[..], &[&self.previous_mac, body.as_bytes()]);
        format!("{body}{MAC_SUFFIX}{}\"}}", hex(&mac))
    }

    /// The line was written: the chain moves past it, the key ratchets.
    pub fn advance(&mut self, line: &str) {
        if let Some(mac) = line
            .rsplit_once(MAC_SUFFIX)
            .and_then(|(_, rest)| unhex(rest.trim_end().strip_suffix("\"}")?))
        {
            self.previous_mac = mac;
        }
        self.key = Zeroizing::new(hmac(&self.key[..], &[b"ratchet"]));
        self.seq += 1;
    }
}

/// Now, RFC 3339 UTC.
fn now() -> String {
    crate::kms::file::now_text()
}

/// The last line's segment and MAC, from the end of the file.
fn last_link(path: &Path) -> Option<(u64, [u8; 32])> {
    let file = std::fs::File::open(path).ok()?;
    let last = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .last()?;
    let (body, mac) = last.rsplit_once(MAC_SUFFIX)?;
    let mac = unhex(mac.trim_end().strip_suffix("\"}")?)?;
    let parsed: serde_json::Value = serde_json::from_str(&format!("{body}}}")).ok()?;
    Some((parsed["segment"].as_u64()?, mac))
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit.key_file {path}: {why}")]
    Key { path: String, why: String },
    #[error("audit.file {path}: {error}")]
    File { path: String, error: std::io::Error },
}

/// Reads the audit key (base64 of 32 bytes, as `redcloak keygen` prints).
pub fn read_key(path: &Path) -> Result<Zeroizing<[u8; 32]>, AuditError> {
    let text = Zeroizing::new(std::fs::read(path).map_err(|e| AuditError::Key {
        path: path.display().to_string(),
        why: e.to_string(),
    })?);
    crate::crypto::keyring::decode_key(0, &text).map_err(|_| AuditError::Key {
        path: path.display().to_string(),
        why: "expected base64 of 32 bytes (make one with `redcloak keygen`)".into(),
    })
}

/// Writes what is queued and a last checkpoint (waiting 2 s at most, and
/// not at all behind a full queue);
/// call before the process exits.
pub fn finish() {
    if let Some(sink) = SINK.get() {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if sink.try_send(Message::Finish(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(2));
        }
    }
}

/// Starts the writer: a new segment linked to the file's last line, then
/// every recorded event, until the process ends. The key is wiped once the
/// segment's chain key is derived. Call once per process.
pub fn start(config: &AuditConfig) -> Result<(), AuditError> {
    let file_error = |error| AuditError::File {
        path: config.file.display().to_string(),
        error,
    };
    let master = read_key(&config.key_file)?;
    let (chain, first) = Chain::start(&master[..], last_link(&config.file), &now());
    drop(master);
    let mut writer = Writer::open(config.clone(), chain).map_err(file_error)?;
    writer.append(&first).map_err(file_error)?;
    let (sender, receiver) = std::sync::mpsc::sync_channel(QUEUED_ENTRIES);
    if SINK.set(sender).is_err() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("redcloak-audit".into())
        .spawn(move || writer.run(receiver))
        .map_err(file_error)?;
    Ok(())
}

struct Writer {
    config: AuditConfig,
    file: std::fs::File,
    length: u64,
    chain: Chain,
    written_since_checkpoint: bool,
}

impl Writer {
    fn open(config: AuditConfig, chain: Chain) -> std::io::Result<Writer> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&config.file)?;
        let length = file.metadata()?.len();
        Ok(Writer {
            config,
            file,
            length,
            chain,
            written_since_checkpoint: false,
        })
    }

    /// Writes one line whole, or cuts off what part of it was written.
    fn append(&mut self, line: &str) -> std::io::Result<()> {
        let bytes = format!("{line}\n");
        if let Err(error) = self.file.write_all(bytes.as_bytes()) {
            let _ = self.file.set_len(self.length);
            return Err(error);
        }
        self.length += bytes.len() as u64;
        self.chain.advance(line);
        self.written_since_checkpoint = true;
        Ok(())
    }

    /// Past `rotate_bytes`: the file moves aside (`FILE.<unix time>`) and
    /// the chain goes on in a new one.
    fn rotate_if_due(&mut self) {
        if self.length < self.config.rotate_bytes {
            return;
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut aside = self.config.file.clone().into_os_string();
        aside.push(format!(".{stamp}"));
        let _ = self.file.sync_all();
        if std::fs::rename(&self.config.file, &aside).is_ok()
            && let Ok(reopened) = Writer::open_file(&self.config.file)
        {
            self.file = reopened;
            self.length = 0;
        }
    }

    fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    }

    fn checkpoint(&mut self) {
        if !self.written_since_checkpoint {
            return;
        }
        let _ = self.file.sync_all();
        self.written_since_checkpoint = false;
        tracing::info!(
            target: CHECKPOINT_TARGET,
            segment = self.chain.segment,
            seq = self.chain.seq.saturating_sub(1),
            mac = %hex(&self.chain.previous_mac),
            "audit checkpoint"
        );
    }

    fn run(mut self, receiver: Receiver<Message>) {
        let mut last_checkpoint = Instant::now();
        let mut disk_warned = false;
        loop {
            let wait = self
                .config
                .checkpoint_every
                .saturating_sub(last_checkpoint.elapsed());
            match receiver.recv_timeout(wait) {
                Ok(Message::Finish(done)) => {
                    self.written_since_checkpoint = true;
                    self.checkpoint();
                    let _ = done.send(());
                }
                Ok(Message::Entry(entry)) => {
                    let line = self.chain.line(&now(), &entry.event, &entry.fields);
                    match self.append(&line) {
                        Ok(()) => disk_warned = false,
                        Err(error) => {
                            DROPPED.fetch_add(1, Ordering::Relaxed);
                            if !disk_warned {
                                disk_warned = true;
                                tracing::warn!(target: CHECKPOINT_TARGET, %error, "audit entry not written (dropped, counted)");
                            }
                        }
                    }
                    self.rotate_if_due();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.checkpoint();
                    return;
                }
            }
            if last_checkpoint.elapsed() >= self.config.checkpoint_every {
                self.checkpoint();
                last_checkpoint = Instant::now();
            }
        }
    }
}

/// What `audit verify` found.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// Lines checked.
    pub lines: u64,
    /// Segments seen.
    pub segments: u64,
}

/// Checks the chain over `files` in order (older first) with the audit
/// key: every MAC, every seq in order, every segment linked to the one
/// before, and each `checkpoints` (segment, seq, MAC) present. `Err` names
/// the first bad entry.
pub fn verify(
    master: &[u8],
    files: &[(String, String)],
    checkpoints: &[(u64, u64, [u8; 32])],
) -> Result<Verified, String> {
    let mut chain: Option<Chain> = None;
    let mut lines = 0;
    let mut segments = 0;
    let mut seen = std::collections::BTreeSet::new();
    for (name, text) in files {
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{name}:{}", number + 1);
            let (body, mac) = line
                .rsplit_once(MAC_SUFFIX)
                .ok_or_else(|| format!("{at}: not an audit line (no mac)"))?;
            let mac = mac
                .strip_suffix("\"}")
                .and_then(unhex)
                .ok_or_else(|| format!("{at}: not an audit line (bad mac)"))?;
            let parsed: serde_json::Value = serde_json::from_str(&format!("{body}}}"))
                .map_err(|_| format!("{at}: not JSON"))?;
            let segment = parsed["segment"]
                .as_u64()
                .ok_or_else(|| format!("{at}: no segment"))?;
            let seq = parsed["seq"]
                .as_u64()
                .ok_or_else(|| format!("{at}: no seq"))?;
            if parsed["event"] == "segment_start" {
                let nonce = parsed["fields"]["nonce"]
                    .as_str()
                    .and_then(|n| {
                        let bytes = unhex(&format!("{n:0<64}"))?;
                        let mut nonce = [0u8; 16];
                        nonce.copy_from_slice(&bytes[..16]);
                        Some(nonce)
                    })
                    .ok_or_else(|| format!("{at}: segment_start without a nonce"))?;
                let linked = parsed["fields"]["previous_mac"]
                    .as_str()
                    .and_then(unhex)
                    .ok_or_else(|| format!("{at}: segment_start without previous_mac"))?;
                if let Some(before) = &chain {
                    if linked != before.previous_mac {
                        return Err(format!(
                            "{at}: segment {segment} does not follow the line before (an entry before it was removed or changed)"
                        ));
                    }
                    if segment != before.segment + 1 {
                        return Err(format!(
                            "{at}: segment {segment} after segment {}",
                            before.segment
                        ));
                    }
                }
                if seq != 0 {
                    return Err(format!("{at}: segment_start with seq {seq}"));
                }
                chain = Some(Chain {
                    key: segment_key(master, segment, &nonce),
                    previous_mac: linked,
                    segment,
                    seq: 0,
                });
                segments += 1;
            }
            let Some(current) = chain.as_mut() else {
                return Err(format!("{at}: the first line is not a segment_start"));
            };
            if segment != current.segment || seq != current.seq {
                return Err(format!(
                    "{at}: expected segment {} seq {}, found segment {segment} seq {seq} (an entry was removed, added or moved)",
                    current.segment, current.seq
                ));
            }
            let expected = hmac(&current.key[..], &[&current.previous_mac, body.as_bytes()]);
            if !bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &mac[..])) {
                return Err(format!(
                    "{at}: segment {segment} seq {seq}: the MAC does not match (the entry was changed)"
                ));
            }
            current.advance(line);
            seen.insert((segment, seq, mac));
            lines += 1;
        }
    }
    for (segment, seq, mac) in checkpoints {
        if !seen.contains(&(*segment, *seq, *mac)) {
            return Err(format!(
                "checkpoint segment {segment} seq {seq} is not in the log: it was truncated or replaced"
            ));
        }
    }
    Ok(Verified { lines, segments })
}

/// A `--checkpoint SEGMENT:SEQ:MAC`.
pub fn parse_checkpoint(text: &str) -> Option<(u64, u64, [u8; 32])> {
    let mut parts = text.split(':');
    let segment = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let mac = unhex(parts.next()?)?;
    parts.next().is_none().then_some((segment, seq, mac))
}

/// The tracing layer that hands every security event (target
/// `redcloak::security`) to the audit writer, when `[audit]` is set.
pub fn layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    SecurityEvents.with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
        metadata.target() == super::events::TARGET
    }))
}

struct SecurityEvents;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SecurityEvents {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if SINK.get().is_none() {
            return;
        }
        let mut fields = Fields(serde_json::Map::new());
        event.record(&mut fields);
        let mut fields = fields.0;
        let name = match fields.remove("event") {
            Some(serde_json::Value::String(name)) => name,
            _ => "security".to_owned(),
        };
        fields.insert("level".into(), event.metadata().level().as_str().into());
        record(Entry {
            event: name,
            fields,
        });
    }
}

/// An event's fields as JSON.
struct Fields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(master: &[u8], events: usize) -> Vec<String> {
        let (mut chain, first) = Chain::start(master, None, "t0");
        chain.advance(&first);
        let mut lines = vec![first];
        for i in 0..events {
            let mut fields = serde_json::Map::new();
            fields.insert("n".into(), i.into());
            let line = chain.line("t", "reload", &fields);
            chain.advance(&line);
            lines.push(line);
        }
        lines
    }

    fn check(master: &[u8], lines: &[String]) -> Result<Verified, String> {
        verify(master, &[("audit".into(), lines.join("\n"))], &[])
    }

    #[test]
    fn a_clean_log_verifies_and_any_edit_deletion_or_reordering_is_named() {
        let master = [7u8; 32];
        let lines = log(&master, 5);
        assert_eq!(
            check(&master, &lines),
            Ok(Verified {
                lines: 6,
                segments: 1
            })
        );
        assert!(check(&[8u8; 32], &lines).is_err(), "another key");

        let mut edited = lines.clone();
        edited[3] = edited[3].replace("\"n\":2", "\"n\":9");
        let err = check(&master, &edited).unwrap_err();
        assert!(
            err.contains("audit:4") && err.contains("MAC does not match"),
            "{err}"
        );

        let mut deleted = lines.clone();
        deleted.remove(2);
        let err = check(&master, &deleted).unwrap_err();
        assert!(
            err.contains("audit:3") && err.contains("expected segment 0 seq 2"),
            "{err}"
        );

        let mut reordered = lines.clone();
        reordered.swap(2, 3);
        assert!(check(&master, &reordered).unwrap_err().contains("audit:3"));
    }

    #[test]
    fn segments_link_and_truncation_shows_against_a_checkpoint() {
        let master = [7u8; 32];
        let first = log(&master, 3);
        let last = last_mac(&first);
        let (mut chain, start) = Chain::start(&master, Some((0, last)), "t1");
        chain.advance(&start);
        let mut second = vec![start];
        let line = chain.line("t", "reload", &serde_json::Map::new());
        chain.advance(&line);
        second.push(line);
        let both = [first.clone(), second.clone()].concat();
        assert_eq!(
            check(&master, &both),
            Ok(Verified {
                lines: 6,
                segments: 2
            })
        );
        // A line cut from the end of the first segment breaks the link.
        let cut = [first[..3].to_vec(), second.clone()].concat();
        assert!(
            check(&master, &cut)
                .unwrap_err()
                .contains("does not follow")
        );
        // The end of the log cut: only a checkpoint shows it.
        let checkpoint = (1, 1, last_mac(&second));
        let truncated = [first, second[..1].to_vec()].concat();
        assert!(check(&master, &truncated).is_ok());
        let err = verify(
            &master,
            &[("a".into(), truncated.join("\n"))],
            &[checkpoint],
        )
        .unwrap_err();
        assert!(err.contains("checkpoint segment 1 seq 1"), "{err}");
        let text = format!("1:1:{}", hex(&checkpoint.2));
        assert_eq!(parse_checkpoint(&text), Some(checkpoint));
    }

    #[test]
    fn a_full_disk_drops_the_entry_counts_it_and_leaves_no_gap() {
        let config = AuditConfig {
            file: PathBuf::from("/dev/full"),
            key_file: PathBuf::new(),
            rotate_bytes: u64::MAX,
            checkpoint_every: Duration::from_secs(60),
        };
        let (chain, _) = Chain::start(&[7u8; 32], None, "t0");
        let mut writer = Writer::open(config, chain).expect("/dev/full opens");
        let before = (writer.chain.seq, writer.chain.previous_mac);
        assert!(writer.append("a line").is_err(), "ENOSPC");
        assert_eq!(
            (writer.chain.seq, writer.chain.previous_mac),
            before,
            "no gap"
        );
        let (sender, receiver) = std::sync::mpsc::sync_channel(4);
        let dropped = dropped();
        sender
            .send(Message::Entry(Entry {
                event: "reload".into(),
                fields: serde_json::Map::new(),
            }))
            .expect("queued");
        drop(sender);
        writer.run(receiver);
        assert!(super::dropped() > dropped, "counted");
    }

    #[test]
    fn rotation_moves_the_file_aside_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let master = [9u8; 32];
        let config = AuditConfig {
            file: dir.path().join("audit.jsonl"),
            key_file: PathBuf::new(),
            rotate_bytes: 2048,
            checkpoint_every: Duration::from_secs(60),
        };
        let (chain, first) = Chain::start(&master, None, "t0");
        let mut writer = Writer::open(config.clone(), chain).expect("opens");
        writer.append(&first).expect("written");
        let (sender, receiver) = std::sync::mpsc::sync_channel(100);
        for i in 0..40 {
            let mut fields = serde_json::Map::new();
            fields.insert("n".into(), i.into());
            let entry = Entry {
                event: "reload".into(),
                fields,
            };
            sender.send(Message::Entry(entry)).expect("queued");
        }
        drop(sender);
        writer.run(receiver);
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p != &config.file)
            .collect();
        files.sort();
        assert!(files.len() >= 2, "rotated: {files:?}");
        files.push(config.file.clone());
        let texts: Vec<(String, String)> = files
            .iter()
            .map(|p| {
                (
                    p.display().to_string(),
                    std::fs::read_to_string(p).expect("read"),
                )
            })
            .collect();
        assert_eq!(
            verify(&master, &texts, &[]),
            Ok(Verified {
                lines: 41,
                segments: 1
            })
        );
        // A rotated file missing: the chain says where.
        let without_one = [texts[..1].to_vec(), texts[2..].to_vec()].concat();
        assert!(verify(&master, &without_one, &[]).is_err());
    }

    fn last_mac(lines: &[String]) -> [u8; 32] {
        let last = lines.last().expect("a line");
        let (_, mac) = last.rsplit_once(MAC_SUFFIX).expect("mac");
        unhex(mac.strip_suffix("\"}").expect("end")).expect("hex")
    }
}
