//! The startup security gate: `redcloak check` and `serve` against a real
//! redis-server set up to fail each check. A failing check means exit 78,
//! a FAIL line naming it, and no listener ever opened.

use crate::support::*;
use serde_json::Value;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use time::{Duration as Days, OffsetDateTime};

struct Outcome {
    code: i32,
    report: Value,
}

impl Outcome {
    fn status(&self, check: &str) -> String {
        let checks = self.report["checks"].as_array().expect("checks");
        let line = checks
            .iter()
            .find(|c| c["name"] == check)
            .unwrap_or_else(|| panic!("no line {check}: {}", self.report));
        line["status"].as_str().expect("status").to_owned()
    }

    fn detail(&self, check: &str) -> String {
        let checks = self.report["checks"].as_array().expect("checks");
        let line = checks.iter().find(|c| c["name"] == check).expect("line");
        line["detail"].as_str().expect("detail").to_owned()
    }
}

/// `redcloak check --format json` with this config.
async fn check(redis: &TestRedis, config: &ProxyConfig) -> Outcome {
    let file = redis.path("gate.toml");
    std::fs::write(&file, config.render()).expect("write");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(redcloak_bin())
            .args(["check", "--format", "json", "--config"])
            .arg(file)
            .output()
            .expect("runs")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&output.stderr)));
    Outcome {
        code: output.status.code().unwrap_or(-1),
        report,
    }
}

/// Asserts `check` fails on `name`, and `serve` refuses to start without
/// ever listening.
async fn assert_refused(redis: &TestRedis, config: &ProxyConfig, name: &str) -> Outcome {
    let outcome = check(redis, config).await;
    assert_eq!(outcome.code, 78, "{}", outcome.report);
    assert_eq!(outcome.report["passed"], false);
    assert_eq!(outcome.status(name), "fail", "{}", outcome.report);
    // Its listener binds port 0 and would log the address it got: the gate
    // refuses before any listener opens, so no such line is ever logged.
    let file = redis.path("serve.toml");
    std::fs::write(&file, config.render()).expect("write");
    let path = file.display().to_string();
    let (code, _, stderr) = tokio::task::spawn_blocking(move || {
        run_redcloak(&["serve", "--log-format", "json", "--config", &path])
    })
    .await
    .expect("join");
    assert_eq!(code, 78, "{stderr}");
    assert!(
        !stderr.contains("\"listening\""),
        "serve opened a listener: {stderr}"
    );
    assert!(
        stderr.contains("refusing to start") && stderr.contains(name),
        "{stderr}"
    );
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_setup_passes_every_check_in_production() {
    let redis = TestRedis::start().await;
    let outcome = check(&redis, &redis.config()).await;
    assert_eq!(outcome.code, 0, "{}", outcome.report);
    assert_eq!(outcome.report["profile"], "production");
    for line in outcome.report["checks"].as_array().expect("checks") {
        assert_eq!(line["status"], "ok", "{line}");
    }
    for name in [
        "tls",
        "redis-certificate",
        "client-cert-required",
        "anonymous-refused",
        "auth",
        "least-privilege",
        "redis-version",
        "round-trip",
        "plaintext-port",
        "certificates",
        "secret-files",
        "password",
        "keyring",
        "downstream",
        "admin-listener",
        "open-files",
    ] {
        outcome.status(name);
    }
    assert!(
        outcome.detail("tls").contains("TLS 1.3"),
        "{}",
        outcome.detail("tls")
    );
    assert!(outcome.detail("redis-version").starts_with("Redis 7."));
    // The text report, and the probe key is gone.
    let file = redis.path("gate.toml");
    let text = Command::new(redcloak_bin())
        .args(["check", "--config"])
        .arg(file)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("ok    anonymous-refused")
            && text.ends_with("result: PASS (0 failed, 0 warnings)\n"),
        "{text}"
    );
    assert_reply(
        &redis
            .admin()
            .await
            .call(&[b"KEYS", b"redcloak:probe:*"])
            .await,
        b"*0\r\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_default_user_fails_in_every_profile() {
    let redis = TestRedis::start_with(RedisSetup {
        default_user_off: false,
        ..RedisSetup::default()
    })
    .await;
    let outcome = assert_refused(&redis, &redis.config(), "anonymous-refused").await;
    assert!(
        outcome
            .detail("anonymous-refused")
            .contains("answered PONG")
    );
    let mut development = redis.config();
    development.top.push("profile = \"development\"".into());
    assert_eq!(
        check(&redis, &development)
            .await
            .status("anonymous-refused"),
        "fail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_does_not_require_client_certificates_fails_outside_development() {
    let redis = TestRedis::start_with(RedisSetup {
        tls_auth_clients: "no",
        ..RedisSetup::default()
    })
    .await;
    assert_refused(&redis, &redis.config(), "client-cert-required").await;
    let mut development = redis.config();
    development.top.push("profile = \"development\"".into());
    let outcome = check(&redis, &development).await;
    assert_eq!(
        (
            outcome.code,
            outcome.status("client-cert-required").as_str()
        ),
        (0, "warn")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_only_fails_in_production_and_passes_in_staging() {
    let setup = RedisSetup {
        extra: vec!["tls-protocols \"TLSv1.2\"".into()],
        ..RedisSetup::default()
    };
    let redis = TestRedis::start_with(setup).await;
    let outcome = assert_refused(&redis, &redis.config(), "tls").await;
    assert!(
        outcome.detail("tls").contains("TLS 1.2"),
        "{}",
        outcome.detail("tls")
    );
    let mut staging = redis.config();
    staging.top.push("profile = \"staging\"".into());
    assert_eq!(check(&redis, &staging).await.status("tls"), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_redis_certificate_fails() {
    let now = OffsetDateTime::now_utc();
    let setup = RedisSetup {
        redis_cert_validity: Some((now - Days::days(400), now - Days::days(30))),
        ..RedisSetup::default()
    };
    let redis = TestRedis::start_with(setup).await;
    let outcome = assert_refused(&redis, &redis.config(), "tls").await;
    assert!(
        outcome.detail("tls").contains("expired"),
        "{}",
        outcome.detail("tls")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soon_expiring_redis_certificate_fails_in_production_and_warns_in_staging() {
    let now = OffsetDateTime::now_utc();
    let setup = RedisSetup {
        redis_cert_validity: Some((now - Days::days(1), now + Days::days(3) + Days::hours(2))),
        ..RedisSetup::default()
    };
    let redis = TestRedis::start_with(setup).await;
    let outcome = assert_refused(&redis, &redis.config(), "redis-certificate").await;
    assert!(
        outcome
            .detail("redis-certificate")
            .contains("expires in 3 days"),
        "{}",
        outcome.detail("redis-certificate")
    );
    let mut staging = redis.config();
    staging.top.push("profile = \"staging\"".into());
    assert_eq!(
        check(&redis, &staging).await.status("redis-certificate"),
        "warn"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_server_name_fails() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .upstream("server_name", "\"redis.elsewhere.example\"");
    let outcome = assert_refused(&redis, &config, "tls").await;
    assert!(
        outcome
            .detail("tls")
            .contains("does not name upstream.server_name"),
        "{}",
        outcome.detail("tls")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weak_password_fails() {
    let setup = RedisSetup {
        password: Some("only-15-chars!!".into()),
        ..RedisSetup::default()
    };
    let redis = TestRedis::start_with(setup).await;
    let outcome = assert_refused(&redis, &redis.config(), "password").await;
    assert!(
        outcome.detail("password").contains("15 characters"),
        "{}",
        outcome.detail("password")
    );
    assert!(
        !outcome.report.to_string().contains("only-15-chars"),
        "the report shows the password"
    );
    let mut development = redis.config();
    development.top.push("profile = \"development\"".into());
    assert_eq!(
        check(&redis, &development).await.status("password"),
        "fail",
        "16 is the minimum everywhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_readable_by_another_group_fails_and_by_our_own_group_passes() {
    let redis = TestRedis::start().await;
    let key = redis.path("key-1");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o640))
        .expect("chmod");
    // Group-readable by redcloak's own group (Kubernetes' fsGroup mounts): fine.
    let own_group = std::fs::metadata("/proc/self")
        .map(|m| m.gid())
        .expect("gid");
    std::os::unix::fs::chown(&key, None, Some(own_group)).expect("chown");
    let outcome = check(&redis, &redis.config()).await;
    assert_eq!(
        (outcome.code, outcome.status("secret-files").as_str()),
        (0, "ok"),
        "{}",
        outcome.report
    );
    // By another group: refused.
    std::os::unix::fs::chown(&key, None, Some(own_group + 4242)).expect("chown");
    let outcome = assert_refused(&redis, &redis.config(), "secret-files").await;
    assert!(
        outcome.detail("secret-files").contains("key-1 (mode 0640)"),
        "{}",
        outcome.detail("secret-files")
    );
    // Readable by everyone: refused whatever the group.
    std::os::unix::fs::chown(&key, None, Some(own_group)).expect("chown");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    assert_refused(&redis, &redis.config(), "secret-files").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_plaintext_port_fails() {
    let plaintext = free_port();
    let setup = RedisSetup {
        extra: vec![format!("port {plaintext}")],
        ..RedisSetup::default()
    };
    let redis = TestRedis::start_with(setup).await;
    let config = redis
        .config()
        .upstream("plaintext_port_probe", &plaintext.to_string());
    let outcome = assert_refused(&redis, &config, "plaintext-port").await;
    assert!(
        outcome.detail("plaintext-port").contains("in plaintext"),
        "{}",
        outcome.detail("plaintext-port")
    );
    // With the port closed the same probe passes.
    let closed = redis
        .config()
        .upstream("plaintext_port_probe", &free_port().to_string());
    assert_eq!(check(&redis, &closed).await.status("plaintext-port"), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_capable_redis_user_fails_in_production_unless_allowed() {
    let setup = RedisSetup {
        acl: Some("~* &* +@all".into()),
        ..RedisSetup::default()
    };
    let redis = TestRedis::start_with(setup).await;
    assert_refused(&redis, &redis.config(), "least-privilege").await;
    let allowed = redis.config().upstream("allow_admin", "true");
    let outcome = check(&redis, &allowed).await;
    assert_eq!(
        (outcome.code, outcome.status("least-privilege").as_str()),
        (0, "warn")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_zero_data_key_fails() {
    let redis = TestRedis::start().await;
    redcloak::dev::write_file(
        &redis.path("key-zero"),
        b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        0o600,
    )
    .expect("write");
    let mut config = redis.config();
    config.encryption =
        "[encryption]\nprimary = 1\n[[encryption.keys]]\nid = 1\nfile = \"key-zero\"\n".into();
    let outcome = assert_refused(&redis, &config, "keyring").await;
    assert!(
        outcome.detail("keyring").contains("[1]"),
        "{}",
        outcome.detail("keyring")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_warn_once_a_day_when_redis_certificate_expires_soon() {
    let now = OffsetDateTime::now_utc();
    let setup = RedisSetup {
        redis_cert_validity: Some((now - Days::days(1), now + Days::days(10))),
        ..RedisSetup::default()
    };
    let redis = TestRedis::start_with(setup).await;
    let mut config = redis.config();
    config.top.push("profile = \"staging\"".into());
    std::fs::write(redis.path("serve.toml"), config.render()).expect("write");
    let serving = ServeChild::start(&redis.path("serve.toml")).await;
    let mut client = serving.raw().await;
    assert_reply(&client.call(&[b"PING"]).await, b"+PONG\r\n");
    drop(client);
    // More clients, each on a new upstream connection (no pool here).
    for _ in 0..3 {
        let mut client = serving.raw().await;
        assert_reply(&client.call(&[b"PING"]).await, b"+PONG\r\n");
    }
    serving.signal("-TERM");
    let (_, logs) = serving.exit_code().await;
    // At startup (the gate's warning), and when upstream connections are made.
    assert!(
        logs.contains("startup check warning") && logs.contains("redis-certificate"),
        "{logs}"
    );
    assert!(
        logs.contains("Redis's TLS certificate expires soon") && logs.contains("\"days_left\":9"),
        "{logs}"
    );
    // Once per certificate and day for the startup checks' connection and
    // once for the server's, not once for each of the 4 client connections.
    let warnings = logs.matches("Redis's TLS certificate expires soon").count();
    assert!(warnings <= 2, "{warnings} warnings: {logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_of_our_own_fails() {
    let redis = TestRedis::start().await;
    let now = OffsetDateTime::now_utc();
    let app_ca = redcloak::dev::Authority::new("app CA").expect("ca");
    let listener = app_ca
        .issue_with(
            "redcloak",
            &["localhost"],
            redcloak::dev::Usage::Server,
            |params| {
                params.not_before = now - Days::days(400);
                params.not_after = now - Days::days(2);
            },
        )
        .expect("cert");
    redcloak::dev::write_file(
        &redis.path("listener.crt"),
        listener.cert_pem.as_bytes(),
        0o644,
    )
    .expect("write");
    redcloak::dev::write_file(
        &redis.path("listener.key"),
        listener.key_pem.as_bytes(),
        0o600,
    )
    .expect("write");
    let config = redis
        .config()
        .tail("[listen.tls]\naddress = \"127.0.0.1:0\"\ncert = \"listener.crt\"\nkey = \"listener.key\"\n");
    let outcome = assert_refused(&redis, &config, "certificates").await;
    assert!(
        outcome
            .detail("certificates")
            .contains("listen.tls.cert has expired"),
        "{}",
        outcome.detail("certificates")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_listener_off_loopback_is_a_warning_and_loopback_passes() {
    let redis = TestRedis::start().await;
    let loopback = redis
        .config()
        .tail("[metrics]\naddress = \"127.0.0.1:9187\"\n");
    let outcome = check(&redis, &loopback).await;
    assert_eq!(
        (outcome.code, outcome.status("admin-listener").as_str()),
        (0, "ok")
    );
    let open = redis
        .config()
        .tail("[metrics]\naddress = \"0.0.0.0:9187\"\n");
    let outcome = check(&redis, &open).await;
    assert_eq!(
        (outcome.code, outcome.status("admin-listener").as_str()),
        (0, "warn")
    );
    assert!(outcome.detail("admin-listener").contains("not loopback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_clients_than_open_files_allow_is_a_warning_that_says_the_numbers() {
    let redis = TestRedis::start().await;
    // Two descriptors a client: more than any hard limit allows (nr_open
    // is at most 2^30).
    let many = redis.config().listen("max_connections = 2000000000");
    let outcome = check(&redis, &many).await;
    assert_eq!(
        (outcome.code, outcome.status("open-files").as_str()),
        (0, "warn"),
        "{}",
        outcome.report
    );
    let detail = outcome.detail("open-files");
    assert!(
        detail.contains("max_connections = 2000000000") && detail.contains("4000000064"),
        "{detail}"
    );
    let few = redis.config().listen("max_connections = 10");
    let outcome = check(&redis, &few).await;
    assert_eq!(outcome.status("open-files"), "ok", "{}", outcome.report);

    // Started with a soft limit of 64, redcloak works with the hard limit.
    let file = redis.path("few.toml");
    std::fs::write(&file, few.render()).expect("write");
    let script = format!(
        "ulimit -Sn 64 && echo \"$(ulimit -Hn)\" && exec {} check --format json --config {}",
        redcloak_bin(),
        file.display()
    );
    let output = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .args(["-c", &script])
            .output()
            .expect("runs")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let (hard, report) = stdout.split_once('\n').expect("two parts");
    let report: serde_json::Value = serde_json::from_str(report).expect("json");
    let detail = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "open-files")
        .map(|c| c["detail"].as_str().unwrap_or_default().to_string())
        .expect("open-files");
    let limit = if hard == "unlimited" {
        hard
    } else {
        hard.trim()
    };
    assert!(
        detail.starts_with(&format!("limit {limit} covers")),
        "{detail}"
    );
}
