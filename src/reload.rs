//! Reload without a restart: the material that rotates (redcloak's upstream
//! client certificate, key, Redis's CA, the upstream password, the
//! Sentinels' own TLS files and password, the TLS listener's certificate,
//! key and client CA, and the keyring) is read again, all of it validated,
//! the upstream part proved with one probe connection (the Sentinel part
//! on a Sentinel), and only then published, all at once.
//! Anything that fails keeps all the old material in use, and says why.
//!
//! ```text
//!   SIGHUP ─────────┐
//!   POST /-/reload ─┼─▶ ReloadRequests ─▶ run: one reload at a time ─▶ Reloader::reload
//!   watch tick ─────┘  (a file changed)     read config + files ─▶ validate ─▶ probe ─▶ publish
//! ```
//!
//! The watch (`reload.watch_interval`, default 10 s) looks at the
//! configuration file and every file a reload reads: where each path
//! resolves to (symlinks followed) and a hash of its content. So a
//! Kubernetes Secret's `..data` symlink swap and a rename into place are
//! both seen, with no inotify.
//!
//! Publishing swaps the upstream's [`Material`] (`arc-swap`): new connections
//! use it, established ones keep their TLS sessions, and the pool replaces
//! its ready connections made with the old material one at a time. The
//! keyring is swapped the same way: the next value sealed uses the new
//! primary, and every value is opened with the keys listed now. Every
//! other setting that changed needs a restart: the reply and the log name
//! each one. Every reload is a security event, counted in
//! `redcloak_reload_failures_total{reason}` when it keeps old material and
//! dated in `redcloak_reload_last_success_timestamp_seconds` when it does not.

use crate::auth::Passwords;
use crate::config::{self, Config, UpstreamConfig};
use crate::crypto::keyring::KeyringShape;
use crate::crypto::{CurrentKeyring, Keyring};
use crate::secret::Secret;
use crate::telemetry::events;
use crate::telemetry::metrics::{Certificate, Metrics, ReloadFailure};
use crate::upstream::pool::Pool;
use crate::upstream::{Login, Material, Upstream};
use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Settings a reload applies: a change to any other needs a restart.
const RELOADABLE: &[&str] = &[
    "upstream.ca",
    "upstream.cert",
    "upstream.key",
    "upstream.password_file",
    "encryption.primary",
    "encryption.keys",
    "encryption.legacy_plaintext",
    "listen.tls.cert",
    "listen.tls.key",
    "listen.tls.client_ca",
    "listen.auth.password_file",
];

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    Endpoint,
    /// The watch saw a file change.
    Watch,
}

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::Endpoint => "endpoint",
            Trigger::Watch => "watch",
        }
    }
}

/// What a reload did: the `POST /-/reload` answer.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Outcome {
    /// Nothing was rejected.
    pub ok: bool,
    /// What it published (setting names).
    pub changed: Vec<String>,
    /// What it kept the old material for, and why.
    pub rejected: Vec<Rejected>,
    /// Settings that changed and take effect only after a restart.
    pub restart_required: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Rejected {
    pub what: String,
    pub why: String,
}

/// Where reload requests go; cloned by whatever triggers them.
#[derive(Clone)]
pub struct ReloadRequests(mpsc::Sender<(Trigger, Option<oneshot::Sender<Outcome>>)>);

/// The receiving end, served by [`run`].
pub struct ReloadQueue(mpsc::Receiver<(Trigger, Option<oneshot::Sender<Outcome>>)>);

pub fn channel() -> (ReloadRequests, ReloadQueue) {
    let (sender, receiver) = mpsc::channel(8);
    (ReloadRequests(sender), ReloadQueue(receiver))
}

impl ReloadRequests {
    /// Asks for a reload and waits for its outcome (`None`: nothing serves
    /// reloads, as before the server is up).
    pub async fn reload(&self, trigger: Trigger) -> Option<Outcome> {
        let (reply, outcome) = oneshot::channel();
        self.0.send((trigger, Some(reply))).await.ok()?;
        outcome.await.ok()
    }

    /// Asks for a reload without waiting (a signal). `false`: nothing serves
    /// reloads, or a few are queued already (they will read the same files).
    pub fn request(&self, trigger: Trigger) -> bool {
        self.0.try_send((trigger, None)).is_ok()
    }
}

/// Serves reload requests one at a time until `shutdown`, and every
/// `watch` looks at the files for a change (which asks for one too).
pub async fn run(
    reloader: Reloader,
    mut queue: ReloadQueue,
    watch: Option<std::time::Duration>,
    shutdown: CancellationToken,
) {
    let mut seen = reloader.files_now();
    // (With the watch off the tick is never awaited after the first.)
    let mut tick = tokio::time::interval(watch.unwrap_or(std::time::Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let (trigger, reply) = tokio::select! {
            _ = shutdown.cancelled() => return,
            request = queue.0.recv() => match request {
                Some(request) => request,
                None => return,
            },
            _ = tick.tick(), if watch.is_some() => {
                let now = reloader.files_now();
                if now == seen {
                    continue;
                }
                (Trigger::Watch, None)
            }
        };
        let outcome = reloader.reload(trigger).await;
        // What was read is the baseline, whatever asked: a change the
        // reload rejected is not retried until the files change again.
        seen = reloader.files_now();
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }
}

/// What the running process was started with, and what it has published.
pub struct Reloader {
    config_path: PathBuf,
    /// The settings at start: what differs from them (and is not
    /// reloadable) needs a restart.
    started_with: BTreeMap<String, String>,
    /// The files the last configuration read names (the watch looks at
    /// them and at the configuration file).
    files: std::sync::Mutex<Vec<PathBuf>>,
    /// A digest of each upstream file and of the password, as published.
    published: std::sync::Mutex<Digests>,
    /// The keyring's primary, ids and check values, as published.
    published_keyring: std::sync::Mutex<KeyringShape>,
    targets: Targets,
}

/// What a reload replaces, in the running server.
pub struct Targets {
    pub upstream: Arc<Upstream>,
    pub pool: Arc<Pool>,
    pub keyring: Arc<CurrentKeyring>,
    /// The KMS-wrapped keys that revalidation unwraps again.
    pub kms: crate::kms::CurrentKms,
    /// The TLS listener's configuration, when there is one.
    pub listener: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    /// The passwords clients log in with, when `[listen.auth]` is set.
    pub client_passwords: Option<Passwords>,
    /// The Sentinels, when `upstream.sentinel` is set (their own TLS and
    /// login reload too).
    pub sentinels: Option<Arc<crate::sentinel::Sentinels>>,
    pub metrics: Arc<Metrics>,
}

impl Reloader {
    /// The process started from `config_path` with the upstream material
    /// whose [`digests`] are `published`.
    pub fn new(config_path: PathBuf, at_start: AtStart, targets: Targets) -> Reloader {
        let started_with = config::settings(&config_path).unwrap_or_default();
        targets.metrics.reload_last_success.set(unix_now());
        Reloader {
            config_path,
            started_with,
            files: std::sync::Mutex::new(at_start.files),
            published: std::sync::Mutex::new(at_start.digests),
            published_keyring: std::sync::Mutex::new(targets.keyring.load().shape()),
            targets,
        }
    }

    /// Where the configuration file and each file it names resolve to, and
    /// a hash of each one's content (an unreadable file hashes as empty).
    fn files_now(&self) -> Vec<(PathBuf, [u8; 32])> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner()).clone();
        std::iter::once(self.config_path.clone())
            .chain(files)
            .map(|path| {
                let target = std::fs::canonicalize(&path).unwrap_or(path);
                let bytes = zeroize::Zeroizing::new(std::fs::read(&target).unwrap_or_default());
                (target, Sha256::digest(&bytes[..]).into())
            })
            .collect()
    }

    /// Reads, validates, proves and publishes; see the module docs.
    pub async fn reload(&self, trigger: Trigger) -> Outcome {
        let mut outcome = Outcome::default();
        let mut failures = Vec::new();
        match config::load(&self.config_path) {
            Err(err) => {
                outcome.rejected.push(Rejected {
                    what: "configuration".into(),
                    why: format!("{err:#}"),
                });
                failures.push(ReloadFailure::Config);
            }
            Ok(config) => {
                *self.files.lock().unwrap_or_else(|e| e.into_inner()) = config.reloaded_files();
                if let Ok(settings) = config::settings(&self.config_path) {
                    outcome.restart_required = needs_restart(&self.started_with, &settings);
                }
                // Everything is validated (and the upstream part proved)
                // before anything is published.
                let digests = digests(&config);
                let upstream = self.prepare_upstream(&config.upstream, &digests).await;
                let listener = self.prepare_listener(&config, &digests);
                let clients = self.prepare_client_passwords(&config, &digests);
                let sentinel = self.prepare_sentinel(&config.upstream, &digests).await;
                let keyring = self.prepare_keyring(config, &digests).await;
                match (upstream, listener, clients, keyring, sentinel) {
                    (Ok(upstream), Ok(listener), Ok(clients), Ok(keyring), Ok(sentinel)) => {
                        let changes = Changes {
                            upstream,
                            listener,
                            clients,
                            keyring,
                            sentinel,
                        };
                        self.publish(changes, digests, &mut outcome);
                    }
                    (upstream, listener, clients, keyring, sentinel) => {
                        let rejected = [
                            upstream.err(),
                            listener.err(),
                            clients.err(),
                            keyring.err(),
                            sentinel.err(),
                        ];
                        for (rejected, failure) in rejected.into_iter().flatten() {
                            outcome.rejected.push(rejected);
                            failures.push(failure);
                        }
                    }
                }
            }
        }
        for failure in &failures {
            self.targets.metrics.reload_failure(*failure).increment(1);
        }
        outcome.ok = outcome.rejected.is_empty();
        if outcome.ok {
            self.targets.metrics.reload_last_success.set(unix_now());
        }
        let rejected: Vec<String> = outcome
            .rejected
            .iter()
            .map(|r| format!("{}: {}", r.what, r.why))
            .collect();
        events::reload(
            trigger.label(),
            &outcome.changed,
            &rejected,
            &outcome.restart_required,
        );
        outcome
    }

    /// The upstream material, if any of it changed: built (every file read
    /// and checked) and proved on one connection.
    async fn prepare_upstream(
        &self,
        config: &UpstreamConfig,
        digests: &Digests,
    ) -> Prepared<UpstreamChange> {
        // The Sentinels' own material is prepare_sentinel's.
        let changed: Vec<String> = self
            .changed(digests, "upstream.")
            .into_iter()
            .filter(|name| !name.starts_with("upstream.sentinel."))
            .collect();
        if changed.is_empty() {
            return Ok(None);
        }
        let what = changed.join(", ");
        let material = match material(config) {
            Ok(material) => material,
            Err(why) => return Err((Rejected { what, why }, ReloadFailure::Files)),
        };
        if let Err(why) = self.prove(&material, config).await {
            return Err((Rejected { what, why }, ReloadFailure::Probe));
        }
        Ok(Some(UpstreamChange {
            material,
            changed,
            expiry: certificate_expiry(&config.cert),
        }))
    }

    /// The Sentinels' TLS material and login, if any of it changed: built
    /// and proved on a Sentinel.
    async fn prepare_sentinel(
        &self,
        config: &UpstreamConfig,
        digests: &Digests,
    ) -> Prepared<(Material, Vec<String>)> {
        let (Some(sentinel), Some(running)) = (&config.sentinel, &self.targets.sentinels) else {
            return Ok(None);
        };
        let changed = self.changed(digests, "upstream.sentinel.");
        if changed.is_empty() {
            return Ok(None);
        }
        let what = changed.join(", ");
        let material = match crate::sentinel::Sentinels::material(sentinel) {
            Ok(material) => material,
            Err(why) => return Err((Rejected { what, why }, ReloadFailure::Files)),
        };
        if let Err(why) = running.prove(&material).await {
            return Err((Rejected { what, why }, ReloadFailure::Probe));
        }
        Ok(Some((material, changed)))
    }

    /// The names under `prefix` whose digests differ from those published.
    fn changed(&self, digests: &Digests, prefix: &str) -> Vec<String> {
        let published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        digests
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .filter(|(name, digest)| published.get(*name) != Some(*digest))
            .map(|(name, _)| (*name).to_owned())
            .collect()
    }

    /// The TLS listener's configuration, if its certificate, key or client
    /// CA changed: built (the certificate matched to its key, within its
    /// validity). Sessions to resume carry over when the client CA did not
    /// change: a session made under a CA no longer trusted must not skip
    /// the client certificate check of a full handshake. A listener added
    /// or removed needs a restart (its address is named then).
    fn prepare_listener(&self, config: &Config, digests: &Digests) -> Prepared<ListenerChange> {
        let (Some(running), Some(tls)) = (&self.targets.listener, &config.listen.tls) else {
            return Ok(None);
        };
        let changed = self.changed(digests, "listen.tls.");
        if changed.is_empty() {
            return Ok(None);
        }
        let what = changed.join(", ");
        let rejected = |why: String| {
            Err((
                Rejected {
                    what: what.clone(),
                    why,
                },
                ReloadFailure::Files,
            ))
        };
        let built = crate::tls::server::config(&tls.cert, &tls.key, tls.client_ca.as_deref());
        let mut server = match built {
            Ok(server) => Arc::unwrap_or_clone(server),
            Err(err) => return rejected(err.to_string()),
        };
        if let Err(why) = still_valid(&tls.cert, "listen.tls.cert") {
            return rejected(why);
        }
        if !changed.iter().any(|name| name == "listen.tls.client_ca") {
            let current = running.load();
            server.session_storage = current.session_storage.clone();
            server.ticketer = current.ticketer.clone();
        }
        Ok(Some(ListenerChange {
            server: Arc::new(server),
            changed,
            expiry: certificate_expiry(&tls.cert),
        }))
    }

    /// The keyring, if it changed: its primary, a key (by its check value),
    /// the legacy policy, or the keyring file. Keys the startup checks
    /// would refuse are refused here too; KMS-wrapped keys are unwrapped
    /// (once: an unreachable KMS rejects the reload, the keys in use stay).
    async fn prepare_keyring(&self, config: Config, digests: &Digests) -> Prepared<KeyringChange> {
        if self.changed(digests, "encryption.keys").is_empty() {
            return Ok(None);
        }
        let rules = crate::checks::keyring_rules(&config);
        let keys = config.encryption.keys;
        let keyring = match keys.keyring(std::time::Duration::ZERO, None).await {
            Ok(keyring) => keyring,
            Err(err) => {
                let what = "encryption.keyring_file".to_owned();
                let why = err.to_string();
                return Err((Rejected { what, why }, ReloadFailure::Kms));
            }
        };
        let shape = keyring.shape();
        let published = self
            .published_keyring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut changed = Vec::new();
        if shape.primary != published.primary {
            changed.push("encryption.primary".to_owned());
        }
        if shape.checks != published.checks {
            changed.push("encryption.keys".to_owned());
        }
        if shape.legacy != published.legacy {
            changed.push("encryption.legacy_plaintext".to_owned());
        }
        let file_text = |kms: Option<&crate::kms::Kms>| kms.map(|kms| kms.file.to_text());
        if file_text(keys.kms.as_deref()) != file_text(self.targets.kms.load().as_deref()) {
            changed.push("encryption.keyring_file".to_owned());
        }
        if let Err(why) = rules {
            let what = changed.join(", ");
            return Err((Rejected { what, why }, ReloadFailure::Files));
        }
        let transitions = transitions(self.targets.kms.load().as_deref(), keys.kms.as_deref());
        Ok(Some(KeyringChange {
            keyring,
            kms: keys.kms,
            changed,
            transitions,
        }))
    }

    /// The passwords clients log in with, if `password_file` changed:
    /// each held to the startup checks' rules. `[listen.auth]` added or
    /// removed needs a restart.
    fn prepare_client_passwords(
        &self,
        config: &Config,
        digests: &Digests,
    ) -> Prepared<(Vec<Secret>, Vec<String>)> {
        let (Some(_), Some(auth)) = (&self.targets.client_passwords, &config.listen.auth) else {
            return Ok(None);
        };
        let changed = self.changed(digests, "listen.auth.");
        if changed.is_empty() {
            return Ok(None);
        }
        if let Err(why) = crate::checks::password_rules(config) {
            let what = changed.join(", ");
            return Err((Rejected { what, why }, ReloadFailure::Files));
        }
        let passwords = auth
            .passwords
            .iter()
            .map(|p| Secret::new(p.expose().to_vec()))
            .collect();
        Ok(Some((passwords, changed)))
    }

    /// Publishes what changed, all at once.
    fn publish(&self, changes: Changes, digests: Digests, outcome: &mut Outcome) {
        let Changes {
            upstream,
            listener,
            clients,
            keyring,
            sentinel,
        } = changes;
        if let (Some((material, changed)), Some(running)) = (sentinel, &self.targets.sentinels) {
            running.publish(material);
            outcome.changed.extend(changed);
        }
        if let (Some((passwords, changed)), Some(running)) =
            (clients, &self.targets.client_passwords)
        {
            running.store(Arc::new(passwords));
            outcome.changed.extend(changed);
        }
        if let Some(change) = upstream {
            self.targets.upstream.publish(change.material);
            self.targets.pool.material_changed();
            if let Some(expiry) = change.expiry {
                self.targets
                    .metrics
                    .set_certificate_expiry(Certificate::UpstreamClient, expiry);
            }
            outcome.changed.extend(change.changed);
        }
        if let (Some(change), Some(running)) = (listener, &self.targets.listener) {
            running.store(change.server);
            if let Some(expiry) = change.expiry {
                self.targets
                    .metrics
                    .set_certificate_expiry(Certificate::Listener, expiry);
            }
            outcome.changed.extend(change.changed);
        }
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = digests;
        if let Some(KeyringChange {
            keyring,
            kms,
            changed,
            transitions,
        }) = keyring
        {
            if !transitions.is_empty() {
                events::keyring_changed(&transitions);
            }
            let shape = keyring.shape();
            self.targets.keyring.publish(keyring);
            self.targets.kms.store(kms);
            *self
                .published_keyring
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = shape;
            outcome.changed.extend(changed);
        }
    }

    /// One connection with the new material: TLS (Redis verified against
    /// the new CA, the new certificate presented), AUTH with the new
    /// password, and `ACL WHOAMI` naming the configured user.
    async fn prove(&self, material: &Material, config: &UpstreamConfig) -> Result<(), String> {
        let probe = self.targets.upstream.with_material(material.clone());
        let mut stream = probe.connect().await.map_err(|err| err.to_string())?;
        let timeout = config.connect_timeout;
        let reply = crate::upstream::call(&mut stream, &[b"ACL", b"WHOAMI"], timeout)
            .await
            .map_err(|err| format!("Redis did not answer ACL WHOAMI: {err}"))?;
        let expected = config.username.as_deref().unwrap_or("default");
        match crate::resp::bulk_body(&reply) {
            Some(user) if user == expected.as_bytes() => Ok(()),
            _ => Err(format!(
                "ACL WHOAMI did not answer '{expected}': {}",
                crate::upstream::error_text(&reply)
            )),
        }
    }
}

/// A part of a reload, validated: `Ok(None)` when it did not change,
/// `Err` with why it is rejected (and how that is counted).
type Prepared<T> = Result<Option<T>, (Rejected, ReloadFailure)>;

/// Everything a reload validated, waiting to be published together.
struct Changes {
    sentinel: Option<(Material, Vec<String>)>,
    upstream: Option<UpstreamChange>,
    listener: Option<ListenerChange>,
    clients: Option<(Vec<Secret>, Vec<String>)>,
    keyring: Option<KeyringChange>,
}

/// A new keyring (KMS-wrapped keys unwrapped and checked), waiting to be
/// published.
struct KeyringChange {
    keyring: Keyring,
    kms: Option<Arc<crate::kms::Kms>>,
    changed: Vec<String>,
    /// Each keyring-file key whose state changed: `3: pending -> active`.
    transitions: Vec<String>,
}

/// The keyring-file keys whose state differs between `before` and `after`.
fn transitions(before: Option<&crate::kms::Kms>, after: Option<&crate::kms::Kms>) -> Vec<String> {
    let states = |kms: Option<&crate::kms::Kms>| -> BTreeMap<u32, &'static str> {
        kms.iter()
            .flat_map(|kms| kms.file.keys.iter().map(|d| (d.id, d.state.label())))
            .collect()
    };
    let (before, after) = (states(before), states(after));
    let ids: std::collections::BTreeSet<u32> = before.keys().chain(after.keys()).copied().collect();
    ids.into_iter()
        .filter_map(|id| {
            let (old, new) = (before.get(&id), after.get(&id));
            (old != new).then(|| {
                format!(
                    "{id}: {} -> {}",
                    old.copied().unwrap_or("absent"),
                    new.copied().unwrap_or("removed")
                )
            })
        })
        .collect()
}

/// New upstream material, proved, waiting to be published.
struct UpstreamChange {
    material: Material,
    changed: Vec<String>,
    expiry: Option<u64>,
}

/// A new TLS listener configuration, waiting to be published.
struct ListenerChange {
    server: Arc<rustls::ServerConfig>,
    changed: Vec<String>,
    expiry: Option<u64>,
}

/// The upstream material `config` names: every file read, the certificate
/// matched to its key (rustls checks it) and within its validity.
fn material(config: &UpstreamConfig) -> Result<Material, String> {
    let tls = crate::tls::client::config(&config.ca, &config.cert, &config.key)
        .map_err(|err| err.to_string())?;
    still_valid(&config.cert, "upstream.cert")?;
    let login = Login {
        username: config.username.clone(),
        password: Secret::new(config.password.expose().to_vec()),
    };
    Ok(Material::new(tls, Arc::new(login)))
}

/// The certificate in `path` has not expired.
fn still_valid(path: &std::path::Path, setting: &str) -> Result<(), String> {
    match crate::tls::inspect::file_expiry(path).map_err(|why| format!("{setting}: {why}"))? {
        Some(expiry) if expiry > SystemTime::now() => Ok(()),
        Some(_) => Err(format!("{setting} has expired")),
        None => Err(format!("{setting}: its validity cannot be read")),
    }
}

/// A digest of each reloadable file and of the upstream password, by
/// setting name.
pub type Digests = BTreeMap<&'static str, [u8; 32]>;

/// What the server started with, as a reload compares it: the digests of
/// its material and the files it came from.
#[derive(Default)]
pub struct AtStart {
    digests: Digests,
    files: Vec<PathBuf>,
}

impl AtStart {
    pub fn of(config: &Config) -> AtStart {
        AtStart {
            digests: digests(config),
            files: config.reloaded_files(),
        }
    }
}

/// The [`Digests`] of `config`'s material (kept to see what a reload
/// changes; a SHA-256 of a password is not the password, and it stays in
/// this process).
fn digests(config: &Config) -> Digests {
    let file = |path: &std::path::Path| -> [u8; 32] {
        let bytes = zeroize::Zeroizing::new(std::fs::read(path).unwrap_or_default());
        Sha256::digest(&bytes[..]).into()
    };
    let upstream = &config.upstream;
    let mut digests = BTreeMap::from([
        ("upstream.ca", file(&upstream.ca)),
        ("upstream.cert", file(&upstream.cert)),
        ("upstream.key", file(&upstream.key)),
        (
            "upstream.password",
            Sha256::digest(upstream.password.expose()).into(),
        ),
    ]);
    if let Some(sentinel) = &upstream.sentinel {
        digests.insert("upstream.sentinel.ca", file(&sentinel.ca));
        digests.insert("upstream.sentinel.cert", file(&sentinel.cert));
        digests.insert("upstream.sentinel.key", file(&sentinel.key));
        digests.insert(
            "upstream.sentinel.password",
            Sha256::digest(sentinel.password.expose()).into(),
        );
    }
    if let Some(auth) = &config.listen.auth {
        let mut all = Sha256::new();
        for password in &auth.passwords {
            all.update(Sha256::digest(password.expose()));
        }
        digests.insert("listen.auth.password", all.finalize().into());
    }
    digests.insert("encryption.keys", config.encryption.keys.fingerprint());
    if let Some(tls) = &config.listen.tls {
        digests.insert("listen.tls.cert", file(&tls.cert));
        digests.insert("listen.tls.key", file(&tls.key));
        let client_ca = tls.client_ca.as_deref().map_or([0; 32], file);
        digests.insert("listen.tls.client_ca", client_ca);
    }
    digests
}

/// The settings that differ from those at start and that a reload does
/// not apply.
fn needs_restart(
    started_with: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut names: Vec<String> = started_with
        .keys()
        .chain(now.keys())
        .filter(|name| started_with.get(*name) != now.get(*name))
        .filter(|name| !RELOADABLE.contains(&name.as_str()))
        .cloned()
        .collect();
    names.sort();
    names.dedup();
    names
}

fn certificate_expiry(path: &std::path::Path) -> Option<u64> {
    crate::tls::inspect::file_expiry(path)
        .ok()
        .flatten()
        .and_then(crate::upstream::unix_time)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settings_a_reload_cannot_apply_need_a_restart() {
        let before: BTreeMap<String, String> = [
            ("upstream.address", "\"a:1\""),
            ("upstream.cert", "\"c1.pem\""),
            ("listen.address", "\"127.0.0.1:1\""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let mut after = before.clone();
        after.insert("upstream.cert".into(), "\"c2.pem\"".into());
        after.insert("upstream.address".into(), "\"b:1\"".into());
        after.insert("limits.max_pending_requests".into(), "10".into());
        after.remove("listen.address");
        assert_eq!(
            needs_restart(&before, &after),
            [
                "limits.max_pending_requests",
                "listen.address",
                "upstream.address"
            ]
        );
        assert!(needs_restart(&before, &before).is_empty());
    }
}
