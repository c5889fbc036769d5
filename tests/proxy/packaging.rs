//! What ships beside the binary: `redcloak certs dev` output that a real
//! redis-server and redcloak accept, `redcloak password`, `redcloak health`.

use crate::support::*;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

fn redcloak(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(redcloak_bin())
        .args(args)
        .output()
        .expect("redcloak runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The lines between `# --- NAME` and `# --- end NAME ---` in `text`.
fn block<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| !l.starts_with(&format!("# --- {name}")))
        .skip(1)
        .take_while(|l| !l.starts_with("# --- end"))
        .collect()
}

/// A redis-server child started from a config file, killed when dropped.
struct RedisProcess(std::process::Child);

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_dev_writes_a_set_that_redis_server_and_redcloak_accept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("certs");
    let out_arg = out.to_str().expect("path");
    let (code, printed, _) = redcloak(&["certs", "dev", "--out", out_arg]);
    assert_eq!(code, 0, "{printed}");
    for (file, mode) in [
        ("ca.crt", 0o644),
        ("redis.crt", 0o644),
        ("redis.key", 0o600),
        ("redcloak-client.crt", 0o644),
        ("redcloak-client.key", 0o600),
        ("redcloak.crt", 0o644),
        ("redcloak.key", 0o600),
    ] {
        let meta = std::fs::metadata(out.join(file)).expect(file);
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    // Existing files are never replaced without --force.
    let ca = std::fs::read(out.join("ca.crt")).expect("ca");
    let (code, _, error) = redcloak(&["certs", "dev", "--out", out_arg]);
    assert_eq!(code, 1);
    assert!(error.contains("pass --force"), "{error}");
    assert_eq!(std::fs::read(out.join("ca.crt")).expect("ca"), ca);
    assert_eq!(
        redcloak(&["certs", "dev", "--out", out_arg, "--if-missing"]).0,
        0
    );
    assert_eq!(std::fs::read(out.join("ca.crt")).expect("ca"), ca);
    let (code, printed, _) = redcloak(&["certs", "dev", "--out", out_arg, "--force"]);
    assert_eq!(code, 0);
    assert_ne!(std::fs::read(out.join("ca.crt")).expect("ca"), ca);

    // redis-server with the printed lines, on a free port, with a password.
    let (password_code, password, _) = redcloak(&["password"]);
    assert_eq!(password_code, 0);
    let password = password.trim().to_owned();
    let redis_port = free_port();
    let mut redis_conf: Vec<String> = block(&printed, "redis.conf")
        .iter()
        .map(|line| {
            line.replace("tls-port 6379", &format!("tls-port {redis_port}"))
                .replace("REDIS_PASSWORD", &password)
        })
        .collect();
    redis_conf.extend([
        "bind 127.0.0.1".into(),
        "save \"\"".into(),
        format!("dir {}", dir.path().display()),
    ]);
    let conf = dir.path().join("redis.conf");
    std::fs::write(&conf, redis_conf.join("\n")).expect("redis.conf");
    let _redis = RedisProcess(
        Command::new("redis-server")
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    wait_listening(redis_port).await;

    // redcloak with the printed lines.
    let password_file = dir.path().join("redis-password");
    redcloak::dev::write_file(&password_file, password.as_bytes(), 0o600).expect("password");
    let key = redcloak::crypto::keyring::generate_key();
    redcloak::dev::write_file(&dir.path().join("key-1"), key.as_bytes(), 0o600).expect("key");
    let (port, tls_port) = (free_port(), free_port());
    let upstream_and_tls = block(&printed, "redcloak.toml")
        .join("\n")
        .replace("\"localhost:6379\"", &format!("\"localhost:{redis_port}\""))
        .replace(
            "/path/to/redis-password",
            password_file.to_str().expect("path"),
        )
        .replace("127.0.0.1:6390", &format!("127.0.0.1:{tls_port}"));
    let config = format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\n\n{upstream_and_tls}\n\n\
         [encryption]\nprimary = 1\n[[encryption.keys]]\nid = 1\nfile = \"key-1\"\n"
    );
    std::fs::write(dir.path().join("redcloak.toml"), config).expect("config");
    let mut child = Command::new(redcloak_bin())
        .args(["serve", "--config"])
        .arg(dir.path().join("redcloak.toml"))
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    wait_listening(port).await;
    let mut client = RawClient::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect"),
    );
    assert_reply(
        &client.call(&[b"SET", b"greeting", b"hello"]).await,
        b"+OK\r\n",
    );
    // The TLS listener, verified with the printed CA.
    let ca_path = out.join("ca.crt");
    let output = Command::new("redis-cli")
        .args(["--tls", "--cacert", ca_path.to_str().expect("path")])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &tls_port.to_string(),
            "get",
            "greeting",
        ])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello\n");
    signal(&child, "-TERM");
    assert_eq!(wait_exit(&mut child), 0);
}

#[test]
fn password_prints_64_random_hex_characters() {
    let (code, first, _) = redcloak(&["password"]);
    assert_eq!(code, 0);
    let first = first.trim();
    assert_eq!(first.len(), 64);
    assert!(first.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(redcloak(&["password"]).1.trim(), first);
}

#[tokio::test]
async fn health_exits_0_only_when_the_url_answers_200() {
    let redis = TestRedis::start().await;
    let proxy = redis
        .start_proxy(
            &redis
                .config()
                .tail("[metrics]\naddress = \"127.0.0.1:0\"\n"),
        )
        .await;
    let admin = proxy.admin.expect("admin");
    // The proxy runs in this runtime: the blocking child runs off it.
    let health =
        |url: String| tokio::task::spawn_blocking(move || redcloak(&["health", "--url", &url]));
    assert_eq!(
        health(format!("http://{admin}/readyz"))
            .await
            .expect("run")
            .0,
        0
    );
    assert_eq!(
        health(format!("http://{admin}/healthz"))
            .await
            .expect("run")
            .0,
        0
    );
    let (code, _, error) = health(format!("http://{admin}/nothing"))
        .await
        .expect("run");
    assert_eq!(code, 1);
    assert!(error.contains("answered 404"), "{error}");
    let nowhere = format!("http://127.0.0.1:{}/readyz", free_port());
    let (code, _, error) = health(nowhere).await.expect("run");
    assert_eq!(code, 1);
    assert!(error.contains("cannot reach"), "{error}");
}
