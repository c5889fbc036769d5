//! The real binary: --help, exit codes, SIGTERM drain, JSON logs, the
//! `redcloak dev` playground, and a redis-benchmark run through the proxy.

use crate::support::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn help_explains_every_subcommand_and_flag() {
    let (code, out, _) = run_redcloak(&["--help"]);
    assert_eq!(code, 0);
    for word in [
        "serve",
        "check",
        "keygen",
        "dev",
        "certs",
        "password",
        "health",
        "--log-format",
        "Exit codes",
        "RUST_LOG",
    ] {
        assert!(out.contains(word), "--help lacks {word}: {out}");
    }
    let (code, out, _) = run_redcloak(&["certs", "dev", "--help"]);
    assert_eq!(code, 0);
    for word in [
        "--out",
        "--hosts",
        "--proxy-hosts",
        "--force",
        "--if-missing",
    ] {
        assert!(out.contains(word), "certs dev --help lacks {word}: {out}");
    }
    let (code, out, _) = run_redcloak(&["serve", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--config") && out.contains("SIGTERM"), "{out}");
    assert!(
        out.contains("/readyz") && out.contains("redcloak::security"),
        "{out}"
    );
    let (code, out, _) = run_redcloak(&["check", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--format") && out.contains("78"), "{out}");
    let (code, out, _) = run_redcloak(&["dev", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--listen"), "{out}");
}

#[test]
fn keygen_prints_a_new_key_and_where_to_put_it() {
    let (code, key, help) = run_redcloak(&["keygen"]);
    assert_eq!(code, 0);
    let decoded =
        redcloak::crypto::keyring::decode_key(1, key.as_bytes()).expect("base64 of 32 bytes");
    assert_eq!(decoded.len(), 32);
    assert!(
        help.contains("[[encryption.keys]]") && help.contains("primary"),
        "{help}"
    );
    let (_, another, _) = run_redcloak(&["keygen"]);
    assert_ne!(key, another, "keys are random");
}

#[test]
fn usage_errors_exit_64() {
    assert_eq!(run_redcloak(&["serve"]).0, 64);
    assert_eq!(run_redcloak(&["no-such-command"]).0, 64);
    assert_eq!(
        run_redcloak(&["serve", "--config", "x", "--log-format", "xml"]).0,
        64
    );
}

#[test]
fn configuration_errors_exit_78_and_name_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    let (code, _, err) = run_redcloak(&["serve", "--config", missing.to_str().expect("utf-8")]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("missing.toml"), "{err}");

    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        "[listen]\naddres = \"127.0.0.1:6380\"\n[upstream]\naddress = \"x:1\"\n",
    )
    .expect("write");
    let (code, _, err) = run_redcloak(&["serve", "--config", typo.to_str().expect("utf-8")]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("addres"), "{err}");

    // A certificate that does not exist is a configuration error too.
    let no_cert = dir.path().join("no-cert.toml");
    std::fs::write(
        &no_cert,
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"127.0.0.1:1\"\nca = \"ca.crt\"\n\
         cert = \"c.crt\"\nkey = \"c.key\"\npassword_file = \"p\"\n\
         [encryption]\nprimary = 1\n[[encryption.keys]]\nid = 1\nfile = \"key-1\"\n",
    )
    .expect("write");
    let key = redcloak::crypto::keyring::generate_key();
    std::fs::write(dir.path().join("key-1"), key.as_bytes()).expect("write");
    redcloak::dev::write_file(&dir.path().join("p"), b"password", 0o600).expect("write");
    let (code, _, err) = run_redcloak(&["serve", "--config", no_cert.to_str().expect("utf-8")]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("upstream.ca") && err.contains("ca.crt"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_then_exits_0() {
    let redis = TestRedis::start().await;
    let config = redis.config().tail("[shutdown]\ngrace_period = \"20s\"\n");
    std::fs::write(redis.path("serve.toml"), config.render()).expect("write");
    let serving = ServeChild::start(&redis.path("serve.toml")).await;
    let address = serving.address;
    let mut busy = serving.raw().await;
    let mut idle = serving.raw().await;
    assert_reply(&idle.call(&[b"PING"]).await, b"+PONG\r\n");
    busy.send(&[b"BLPOP", b"plain:nothing", b"1"]).await;
    wait_until_blocked(&redis, 1).await;
    serving.signal("-TERM");
    // The idle client is closed, the blocked one gets its reply first.
    idle.expect_closed().await;
    assert_reply(&busy.read().await, b"*-1\r\n");
    busy.expect_closed().await;
    let (code, logs) = serving.exit_code().await;
    assert_eq!(code, 0, "{logs}");
    for line in logs.lines() {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not a JSON log line: {line}"
        );
    }
    assert!(logs.contains("SIGTERM"), "{logs}");
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "still listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_playground_serves_in_front_of_a_tls_only_redis_and_cleans_up() {
    // Port 0 for both: the banner says which ports they got.
    let mut child = Command::new(redcloak_bin())
        .args(["dev", "--listen", "127.0.0.1:0"])
        .args(["--metrics", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let banner = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("line");
            let done = line.contains("Ctrl-C stops both");
            lines.push(line);
            if done {
                break;
            }
        }
        lines.join("\n")
    })
    .await
    .expect("banner");
    let port_after = |marker: &str| -> u16 {
        banner
            .split(marker)
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no port after {marker:?} in {banner}"))
    };
    let port = port_after("serving on 127.0.0.1:");
    let metrics_port = port_after("Metrics: http://127.0.0.1:");
    assert_ne!(port, 0);
    assert_ne!(metrics_port, 0);
    // The banner shows what Redis stores for a value written through redcloak.
    assert!(
        banner.contains("Redis holds:\n    \"\\xc7\\nK\\x01")
            && banner.contains("(67 bytes: an envelope, not the value)"),
        "{banner}"
    );
    let dir = banner
        .lines()
        .find_map(|l| l.split("removes ").nth(1))
        .map(|d| std::path::PathBuf::from(d.trim()))
        .expect("temp dir named");
    assert!(dir.join("redis.conf").exists());
    let conf = std::fs::read_to_string(dir.join("redis.conf")).expect("redis.conf");
    assert!(
        conf.contains("port 0")
            && conf.contains("tls-auth-clients yes")
            && conf.contains("user default off")
    );

    let mut c = RawClient::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect"),
    );
    assert_reply(&c.call(&[b"SET", b"greeting", b"hello"]).await, b"+OK\r\n");
    assert_reply(&c.call(&[b"GET", b"greeting"]).await, b"$5\r\nhello\r\n");
    drop(c);
    let admin = ([127, 0, 0, 1], metrics_port).into();
    assert_eq!(http_get(admin, "/readyz").await, (200, "ready\n".into()));
    // Redis itself holds the envelope, not the value.
    let redis_port: u16 = banner
        .split("redis-server on 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|port| port.parse().ok())
        .expect("redis port in the banner");
    let tls = redcloak::tls::client::config(
        &dir.join("ca.crt"),
        &dir.join("redcloak-client.crt"),
        &dir.join("redcloak-client.key"),
    )
    .expect("tls");
    let password = std::fs::read(dir.join("redis-password")).expect("password");
    let login = redcloak::upstream::Login {
        username: Some("redcloak".into()),
        password: redcloak::secret::Secret::new(password),
    };
    let settings = redcloak::upstream::UpstreamSettings {
        address: format!("127.0.0.1:{redis_port}"),
        server_name: "localhost".into(),
        connect_timeout: Duration::from_secs(5),
    };
    let upstream = redcloak::upstream::Upstream::new(settings, tls, std::sync::Arc::new(login))
        .expect("upstream");
    let mut direct = RawClient::new(upstream.connect().await.expect("direct TLS connection"));
    let stored = direct.call(&[b"GET", b"greeting"]).await;
    let stored = redcloak::resp::bulk_body(&stored)
        .expect("stored value")
        .to_vec();
    assert_eq!(stored.len(), 5 + redcloak::crypto::envelope::OVERHEAD);
    assert!(!stored.windows(5).any(|w| w == b"hello"));
    drop(direct);
    signal(&child, "-INT");
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .expect("join");
    assert_eq!(code, 0);
    assert!(!dir.exists(), "temporary files left in {}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_pipelined_through_redcloak_finishes_without_errors() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let port = proxy.addr().port().to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("redis-benchmark")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                "set,get",
                "-P",
                "16",
                "-c",
                "50",
                "-n",
                "200000",
                "-q",
            ])
            .output()
            .expect("redis-benchmark runs")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("SET: ") && text.contains("GET: "), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
}

#[test]
fn dev_without_redis_server_says_how_to_install_it() {
    let empty = tempfile::tempdir().expect("tempdir");
    let output = Command::new(redcloak_bin())
        .args(["dev", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics", &format!("127.0.0.1:{}", free_port())])
        .env("PATH", empty.path())
        .output()
        .expect("runs");
    let error = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{error}");
    assert!(
        error.contains("redis-server is not installed")
            && error.contains("apt-get install redis-server"),
        "{error}"
    );
}
