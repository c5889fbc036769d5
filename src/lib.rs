//! redcloak: a Redis security sidecar.
//!
//! ```text
//!  app ──RESP──▶ server ──▶ session ─────────────────────────▶ upstream ──mTLS+AUTH──▶ Redis
//!  (tcp, unix,   (accept,   requests: resp::RequestParser
//!   tls)          limits)             -> policy::classify (a plan) -> session::seal -> command
//!                           replies:  resp::ReplyScanner -> session::pipeline (FIFO of plans)
//!  app ◀──RESP── ◀───────── ◀─────────────────────────────────────────────── Redis
//! ```
//!
//! Modules, in the order a request travels:
//!
//! * [`cli`], [`config`]: command line, and the validated configuration.
//! * [`server`], [`shutdown`]: listeners, accept loop, admission (connection limits,
//!   eviction of silent connections), drain on SIGTERM; [`open_files`]: the descriptors
//!   those connections need.
//! * [`tls`]: PEM loading and the rustls configs of both sides.
//! * [`session`]: one client, on a shared lane or pinned to an upstream connection of its own
//!   (parked while quiet on a clean connection); `seal` seals the arguments a plan names,
//!   `pipeline` matches replies to requests and opens pub/sub messages, `open` opens the
//!   sealed values in a reply.
//! * [`resp`]: RESP parsing, framing and encoding (pure).
//! * [`policy`]: what to do with each command; `policy::table` is the one table of commands
//!   (every per-command fact), `policy::values` the plans for commands on stored values,
//!   `policy::rules` which keys are encrypted and how bound, `policy::local` what redcloak
//!   answers itself for a client on a lane (and replays when it is pinned), `policy::script` proves which
//!   keys a Lua script or library touches, `policy::known` the scripts whose effect on values
//!   is known (pure).
//! * [`crypto`]: the envelopes (XAES-256-GCM, random; AES-SIV, deterministic for members),
//!   HyperLogLog tokens, bound to kind, key or rule, and field; and the keyring (pure).
//! * [`checks`]: the startup security checks (`redcloak check`, and before `serve` listens):
//!   the upstream's TLS, AUTH and ACL proved, files, keys, passwords and listeners inspected.
//! * [`kms`]: data keys wrapped by a KMS (Vault/OpenBao Transit, AWS KMS, PKCS#11): the keyring file, unwrapping
//!   at start and on reload, revalidation that drops a key a KMS denies; no KMS call per value.
//! * [`auth`], [`secret`]: client AUTH checks and brute-force lockout; secrets that never print.
//! * [`upstream`]: the only way to reach Redis: TCP, TLS, AUTH; `upstream::check` proves it
//!   works every few seconds (readiness); `upstream::pool` keeps warm
//!   connections and undoes what a client left on returned ones; `upstream::lane` the lanes,
//!   connections many clients share: a writer, a reader and the pure routing book
//!   (`lane::book`) that hands each reply to the client that asked.
//! * [`telemetry`] (metrics, security events, readiness), [`admin`], [`logs`]: what
//!   operators see, the admin listener serving /metrics, /healthz and /readyz, and logs
//!   that never hold up serving. Telemetry depends on nothing that reports to it.
//! * [`reload`]: SIGHUP and `POST /-/reload` read the upstream certificates, key, CA,
//!   password and the keyring again, prove them and publish them whole (or keep the old).
//! * [`rekey`]: `redcloak rekey` re-encrypts what Redis holds under one key (compare-and-swap
//!   per value), so an old key can be retired.
//! * [`dev`], [`playground`]: throwaway certificates and redis-server for `redcloak dev` and the tests.

pub mod admin;
pub mod auth;
pub mod checks;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod kms;
pub mod logs;
pub mod open_files;
pub mod playground;
pub mod policy;
pub mod rekey;
pub mod reload;
pub mod resp;
pub mod secret;
pub mod sentinel;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod upstream;
