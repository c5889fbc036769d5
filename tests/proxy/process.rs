//! The process as an operator meets it: signals (SIGHUP reloads and never kills it, a
//! drain that runs out of time or is cut short by a second signal exits
//! non-zero) and crashes (no core dump, which would hold keys and passwords).

use crate::support::*;

/// `redcloak serve` in front of `redis`, with `extra` config appended.
async fn serve(redis: &TestRedis, extra: &str) -> ServeChild {
    let config = redis.config().tail(extra);
    let file = redis.path("serve.toml");
    std::fs::write(&file, config.render()).expect("write config");
    ServeChild::start(&file).await
}

/// A client blocked in BLPOP: a request in flight that a drain waits for.
async fn request_in_flight(
    redis: &TestRedis,
    serving: &ServeChild,
) -> RawClient<tokio::net::TcpStream> {
    let mut client = serving.raw().await;
    client.send(&[b"BLPOP", b"plain:queue", b"0"]).await;
    wait_until_blocked(redis, 1).await;
    client
}

/// SIGHUP reloads (here: a new upstream password that Redis already
/// takes, under 20 clients that see no failed request) and never kills
/// the process; the reload is a security event in the log, which names
/// what changed and never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_never_kills() {
    let redis = TestRedis::start().await;
    let serving = serve(&redis, "").await;
    let mut client = serving.raw().await;
    assert_reply(&client.call(&[b"PING"]).await, b"+PONG\r\n");
    let (stop, load, tasks) = crate::reload::start_load(serving.address);
    let new = redcloak::dev::random_password().expect("password");
    let add = format!(">{new}");
    let mut admin = redis.admin().await;
    let set = admin
        .call(&[b"ACL", b"SETUSER", REDIS_USER.as_bytes(), add.as_bytes()])
        .await;
    assert_reply(&set, b"+OK\r\n");
    redcloak::dev::write_file(&redis.path("redis-password"), new.as_bytes(), 0o600).expect("write");
    serving.signal("-HUP");
    eventually("the reload is logged", || async {
        let logs = serving.logs();
        logs.contains("SIGHUP: reloading")
            && logs.contains("reloaded")
            && logs.contains("upstream.password")
    })
    .await;
    crate::reload::stop_load(stop, &load, tasks).await;
    assert!(
        !serving.logs().contains(&new),
        "the password is never logged"
    );
    // The same client, and a new one, are still served.
    assert_reply(&client.call(&[b"PING"]).await, b"+PONG\r\n");
    assert_reply(&serving.raw().await.call(&[b"PING"]).await, b"+PONG\r\n");
    drop(client);
    serving.signal("-TERM");
    assert_eq!(serving.exit_code().await.0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_runs_out_of_grace_exits_non_zero() {
    let redis = TestRedis::start().await;
    let serving = serve(&redis, "[shutdown]\ngrace_period = \"1s\"\n").await;
    let _blocked = request_in_flight(&redis, &serving).await;
    serving.signal("-TERM");
    let (code, logs) = serving.exit_code().await;
    assert_eq!(code, 1, "{logs}");
    assert!(
        logs.contains("grace_period ran out: 1 connections were cut"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_while_draining_exits_at_once() {
    let redis = TestRedis::start().await;
    let serving = serve(&redis, "[shutdown]\ngrace_period = \"300s\"\n").await;
    let _blocked = request_in_flight(&redis, &serving).await;
    serving.signal("-TERM");
    eventually("the drain starts", || async {
        serving.logs().contains("SIGTERM: draining")
    })
    .await;
    serving.signal("-TERM");
    // Well before the 300 s grace period (exit_code waits 30 s at most).
    let (code, logs) = serving.exit_code().await;
    assert_eq!(code, 1, "{logs}");
    assert!(
        logs.contains("SIGTERM while draining: exiting now"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_writes_no_core_dump_even_when_core_dumps_are_allowed() {
    let redis = TestRedis::start().await;
    let config = redis.config();
    let file = redis.path("serve.toml");
    std::fs::write(&file, config.render()).expect("write config");
    let cwd = tempfile::tempdir().expect("cwd");
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "ulimit -c unlimited && exec {} serve --log-format json --config {}",
            redcloak_bin(),
            file.display()
        ))
        .current_dir(cwd.path());
    let serving = ServeChild::spawn(command).await;
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", serving.child.id())).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core limit");
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    serving.signal("-ABRT");
    let (code, _) = serving.exit_code().await;
    assert_ne!(code, 0);
    let files: Vec<_> = std::fs::read_dir(cwd.path())
        .expect("read cwd")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(files.is_empty(), "a core dump was written: {files:?}");
}

/// The TCP ports a process listens on (from `ss`), for a child whose logs
/// cannot be read.
fn listening_ports(pid: u32) -> Vec<u16> {
    let output = std::process::Command::new("ss")
        .args(["-Hltnp"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&format!("pid={pid},")))
        .filter_map(|line| {
            line.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// A child process killed when the test ends, passed or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// redcloak serve on a unix socket only (its one TCP port is the admin
/// listener), its stderr set up by `stderr`, logging at debug.
async fn serve_with_stderr(
    redis: &TestRedis,
    stderr: std::process::Stdio,
) -> (Killed, std::path::PathBuf) {
    let socket = redis.path("logs.sock");
    let mut config = redis.config();
    config.listen = vec![format!("unix_socket = \"{}\"", socket.display())];
    let config = config.tail("[metrics]\naddress = \"127.0.0.1:0\"\n");
    let file = redis.path("logs.toml");
    std::fs::write(&file, config.render()).expect("write config");
    let child = std::process::Command::new(redcloak_bin())
        .args(["serve", "--config"])
        .arg(&file)
        .env("RUST_LOG", "debug")
        .stderr(stderr)
        .spawn()
        .expect("spawn");
    let child = Killed(child);
    let path = socket.clone();
    until("redcloak listens on its unix socket", || {
        let path = path.clone();
        async move {
            tokio::net::UnixStream::connect(&path)
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
    (child, socket)
}

async fn every_command_answered(socket: &std::path::Path, connections: usize, each: usize) {
    for _ in 0..connections {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .expect("connect");
        let mut client = RawClient::new(stream);
        for _ in 0..each {
            assert_reply(&client.call(&[b"PING"]).await, b"+PONG\r\n");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_disk_costs_log_lines_not_requests() {
    let redis = TestRedis::start().await;
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let (mut child, socket) = serve_with_stderr(&redis, full.into()).await;
    every_command_answered(&socket, 200, 10).await;
    let pid = child.0.id();
    let dropped = until("the dropped log lines are counted", || async {
        for port in listening_ports(pid) {
            let (status, body) = http_get(([127, 0, 0, 1], port).into(), "/metrics").await;
            if status == 200 {
                return metric(&body, "redcloak_log_lines_dropped_total").filter(|n| *n > 0.0);
            }
        }
        None
    })
    .await;
    assert!(dropped >= 200.0, "{dropped}");
    signal(&child.0, "-TERM");
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child.0))
        .await
        .expect("join");
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stderr_closed_before_start_stops_nothing() {
    let redis = TestRedis::start().await;
    let (mut child, socket) = {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        serve_with_stderr(&redis, writer.into()).await
    };
    every_command_answered(&socket, 20, 10).await;
    signal(&child.0, "-TERM");
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child.0))
        .await
        .expect("join");
    assert_eq!(code, 0, "no panic (101) on a broken stderr");
}
