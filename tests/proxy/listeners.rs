//! Downstream listeners: plaintext TCP, unix socket with its file mode, TLS
//! with and without required client certificates, and the connection limit.

use crate::support::*;
use redcloak::dev::{Authority, Usage, write_file};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use tokio::net::UnixStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_clients_are_served_and_the_socket_has_its_mode() {
    let redis = TestRedis::start().await;
    let socket = redis.path("redcloak.sock");
    let config = redis
        .config()
        .listen(&format!("unix_socket = \"{}\"", socket.display()))
        .listen("unix_socket_mode = \"0600\"");
    let proxy = redis.start_proxy(&config).await;
    let mode = std::fs::metadata(&socket)
        .expect("socket exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let mut raw = RawClient::new(UnixStream::connect(&socket).await.expect("connect"));
    assert_reply(&raw.call(&[b"SET", b"via", b"unix"]).await, b"+OK\r\n");
    let url = format!("redis+unix://{}", socket.display());
    let mut client = redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let value: String = redis::cmd("GET")
        .arg("via")
        .query_async(&mut client)
        .await
        .expect("GET");
    assert_eq!(value, "unix");
    // Shutdown removes the socket file.
    proxy.shutdown.cancel();
    eventually("the socket file is removed", || async { !socket.exists() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_socket_is_never_taken_over_and_a_stale_one_is_replaced() {
    let redis = TestRedis::start().await;
    let socket = redis.path("shared.sock");
    let config = redis
        .config()
        .listen(&format!("unix_socket = \"{}\"", socket.display()));
    let _first = redis.start_proxy(&config).await;
    // A second instance with the same socket refuses to start (exit 78).
    let file = redis.path("second.toml");
    std::fs::write(&file, config.render()).expect("write config");
    let (code, _, stderr) = tokio::task::spawn_blocking(move || {
        run_redcloak(&["serve", "--config", &file.display().to_string()])
    })
    .await
    .expect("join");
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("another process is serving on the unix socket"),
        "{stderr}"
    );
    // The first instance still owns the socket.
    let mut raw = RawClient::new(UnixStream::connect(&socket).await.expect("connect"));
    assert_reply(&raw.call(&[b"PING"]).await, b"+PONG\r\n");

    // A socket file nobody listens on is stale: replaced.
    let stale = redis.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let config = redis
        .config()
        .listen(&format!("unix_socket = \"{}\"", stale.display()));
    let _second = redis.start_proxy(&config).await;
    let mut raw = RawClient::new(UnixStream::connect(&stale).await.expect("connect"));
    assert_reply(&raw.call(&[b"PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_never_appears_with_a_looser_mode_whatever_the_umask() {
    let redis = TestRedis::start().await;
    // A folder other users may enter, so only the socket's mode guards it.
    let open_dir = tempfile::tempdir().expect("dir");
    std::fs::set_permissions(open_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let socket = open_dir.path().join("redcloak.sock");
    let config = redis
        .config()
        .listen(&format!("unix_socket = \"{}\"", socket.display()));
    let file = redis.path("umask.toml");
    std::fs::write(&file, config.render()).expect("write config");
    // Watch the path as fast as possible while redcloak starts under umask 000.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (socket, watching) = (socket.clone(), watching.clone());
        std::thread::spawn(move || {
            let mut modes = std::collections::BTreeSet::new();
            // Until told to stop, and (on a busy machine this thread may
            // first run late) until it has seen the socket at least once.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while (watching.load(std::sync::atomic::Ordering::Relaxed) || modes.is_empty())
                && std::time::Instant::now() < deadline
            {
                if let Ok(meta) = std::fs::symlink_metadata(&socket) {
                    modes.insert(meta.permissions().mode() & 0o777);
                }
            }
            modes
        })
    };
    let mut command = std::process::Command::new("sh");
    command.arg("-c").arg(format!(
        "umask 000 && exec {} serve --log-format json --config {}",
        redcloak_bin(),
        file.display()
    ));
    let serving = ServeChild::spawn(command).await;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let modes = watcher.join().expect("watcher");
    assert_eq!(modes.into_iter().collect::<Vec<_>>(), [0o660]);
    // Another user cannot connect; its owner can. (redis-cli from Debian's
    // redis-tools: a binary that user may run, so the refusal is the socket's.)
    let other = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/redis-cli", "-s"])
        .arg(&socket)
        .arg("PING")
        .output()
        .expect("setpriv");
    let said = String::from_utf8_lossy(&other.stdout).into_owned()
        + &String::from_utf8_lossy(&other.stderr);
    assert!(
        said.contains(&format!(
            "Could not connect to Redis at {}: Permission denied",
            socket.display()
        )),
        "{said}"
    );
    let mut raw = RawClient::new(UnixStream::connect(&socket).await.expect("connect"));
    assert_reply(&raw.call(&[b"PING"]).await, b"+PONG\r\n");
    drop(serving);
}

/// Certificates for redcloak's own TLS listener and for the app.
struct ListenerCerts {
    ca: String,
    app_cert: String,
    app_key: String,
    other_cert: String,
    other_key: String,
}

fn listener_certs(redis: &TestRedis) -> ListenerCerts {
    let app_ca = Authority::new("app CA").expect("ca");
    let other_ca = Authority::new("someone else's CA").expect("ca");
    let server = app_ca
        .issue("redcloak", &["localhost", "127.0.0.1"], Usage::Server)
        .expect("server cert");
    let app = app_ca
        .issue("app", &[], Usage::Client)
        .expect("client cert");
    let other = other_ca
        .issue("intruder", &[], Usage::Client)
        .expect("client cert");
    let files = [
        ("app-ca.crt", app_ca.cert_pem().to_owned(), 0o644),
        ("listener.crt", server.cert_pem, 0o644),
        ("listener.key", server.key_pem, 0o600),
        ("app.crt", app.cert_pem, 0o644),
        ("app.key", app.key_pem, 0o600),
        ("other.crt", other.cert_pem, 0o644),
        ("other.key", other.key_pem, 0o600),
    ];
    for (name, contents, mode) in files {
        write_file(&redis.path(name), contents.as_bytes(), mode).expect("write");
    }
    let path = |name: &str| redis.path(name).display().to_string();
    ListenerCerts {
        ca: path("app-ca.crt"),
        app_cert: path("app.crt"),
        app_key: path("app.key"),
        other_cert: path("other.crt"),
        other_key: path("other.key"),
    }
}

fn redis_cli(args: &[&str]) -> (bool, String) {
    let output = Command::new("redis-cli")
        .args(args)
        .output()
        .expect("redis-cli runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

async fn cli(args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        redis_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .expect("join")
}

fn tls_args(port: u16, ca: &str, cert: Option<(&str, &str)>, command: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--tls",
        "--cacert",
        ca,
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    if let Some((cert, key)) = cert {
        args.extend(["--cert", cert, "--key", key].map(str::to_owned));
    }
    args.extend(command.iter().map(|s| s.to_string()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_requires_a_client_certificate_from_client_ca() {
    let redis = TestRedis::start().await;
    let certs = listener_certs(&redis);
    let config = redis.config().tail(
        "[listen.tls]\naddress = \"127.0.0.1:0\"\ncert = \"listener.crt\"\nkey = \"listener.key\"\nclient_ca = \"app-ca.crt\"\n\
         [metrics]\naddress = \"127.0.0.1:0\"\n",
    );
    let proxy = redis.start_proxy(&config).await;
    let port = proxy.tls_address.expect("tls listener").port();

    let good = tls_args(
        port,
        &certs.ca,
        Some((&certs.app_cert, &certs.app_key)),
        &["SET", "tls", "ok"],
    );
    assert_eq!(cli(good).await, (true, "OK\n".to_owned()));
    let good = tls_args(
        port,
        &certs.ca,
        Some((&certs.app_cert, &certs.app_key)),
        &["GET", "tls"],
    );
    assert_eq!(cli(good).await, (true, "ok\n".to_owned()));

    for cert in [
        None,
        Some((certs.other_cert.as_str(), certs.other_key.as_str())),
    ] {
        let (_, text) = cli(tls_args(port, &certs.ca, cert, &["GET", "tls"])).await;
        assert!(
            !text.contains("ok"),
            "a client without a trusted certificate was served: {text}"
        );
    }
    let text = proxy.scrape().await;
    let value = |series: &str| metric(&text, series);
    assert_eq!(
        value("redcloak_client_connections_accepted_total{listener=\"tls\"}"),
        Some(4.0)
    );
    assert_eq!(
        value("redcloak_client_connections_rejected_total{reason=\"tls_handshake\"}"),
        Some(2.0)
    );
    let expiry = value("redcloak_certificate_expiry_timestamp_seconds{certificate=\"listener\"}");
    assert!(expiry.expect("listener expiry") > 1.7e9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_without_client_ca_serves_clients_without_certificates() {
    let redis = TestRedis::start().await;
    let certs = listener_certs(&redis);
    let config = redis
        .config()
        .tail("[listen.tls]\naddress = \"127.0.0.1:0\"\ncert = \"listener.crt\"\nkey = \"listener.key\"\n");
    let proxy = redis.start_proxy(&config).await;
    let port = proxy.tls_address.expect("tls listener").port();
    assert_eq!(
        cli(tls_args(port, &certs.ca, None, &["PING"])).await,
        (true, "PONG\n".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_works_through_the_plaintext_listener() {
    let redis = TestRedis::start().await;
    let proxy = redis.start_proxy(&redis.config()).await;
    let port = proxy.addr().port().to_string();
    let base = ["-h", "127.0.0.1", "-p", port.as_str()];
    let run = |command: &[&str]| {
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        args.extend(command.iter().map(|s| s.to_string()));
        cli(args)
    };
    assert_eq!(
        run(&["SET", "greeting", "hello world"]).await,
        (true, "OK\n".into())
    );
    assert_eq!(
        run(&["GET", "greeting"]).await,
        (true, "hello world\n".into())
    );
    assert!(run(&["--no-raw", "HELLO", "3"]).await.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_over_max_connections_get_an_error_and_are_closed() {
    let redis = TestRedis::start().await;
    let proxy = redis
        .start_proxy(
            &redis
                .config()
                .listen("max_connections = 2")
                .tail("[metrics]\naddress = \"127.0.0.1:0\""),
        )
        .await;
    let mut first = proxy.raw().await;
    let mut second = proxy.raw().await;
    assert_reply(&first.call(&[b"PING"]).await, b"+PONG\r\n");
    assert_reply(&second.call(&[b"PING"]).await, b"+PONG\r\n");
    let mut third = proxy.raw().await;
    assert_reply(
        &third.read().await,
        b"-ERR max number of clients reached\r\n",
    );
    third.expect_closed().await;
    let text = proxy.scrape().await;
    assert_eq!(
        metric(
            &text,
            "redcloak_client_connections_rejected_total{reason=\"limit\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "redcloak_client_connections_active"),
        Some(2.0)
    );
    // A freed slot is given to the next client.
    drop(first);
    until("the freed slot is given to the next client", || async {
        let mut next = proxy.raw().await;
        next.send(&[b"PING"]).await;
        (next.read().await.as_ref() == b"+PONG\r\n").then_some(())
    })
    .await;
}
