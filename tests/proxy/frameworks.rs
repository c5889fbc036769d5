//! Real frameworks through redcloak, each with the encrypt-all default plus
//! only the rules docs/frameworks.md gives for it (read from that file, so
//! the documented lines are the tested ones): Celery, RQ, Huey and the
//! Socket.IO Redis adapter, installed from PyPI and npm by
//! scripts/frameworks-setup.sh. After each, Redis is searched for the
//! payloads in clear, in what it stores and in what it published.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

/// The folder holding the frameworks' venv and node_modules; installed once
/// per test binary. A failed install fails the test: nothing is skipped.
fn frameworks() -> PathBuf {
    static READY: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = ready.as_ref() {
        return dir.clone();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(root.join("scripts/frameworks-setup.sh"))
        .output()
        .expect("run scripts/frameworks-setup.sh");
    assert!(
        output.status.success(),
        "installing the frameworks failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    *ready = Some(dir.clone());
    dir
}

/// The `[[encryption.rules]]` lines docs/frameworks.md gives a framework:
/// the first ```toml block under its `## ` heading.
fn documented_rules(framework: &str) -> String {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/frameworks.md"))
            .expect("docs/frameworks.md");
    let section = docs
        .split("\n## ")
        .find(|s| s.starts_with(framework))
        .unwrap_or_else(|| panic!("docs/frameworks.md has no section {framework}"));
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_else(|| panic!("docs/frameworks.md: {framework} has no toml block"));
    block.to_owned()
}

/// Runs an example to its end (at most two minutes), returning its stdout;
/// a failure shows both streams.
async fn run_example(program: PathBuf, args: Vec<String>) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/frameworks");
    let run = tokio::task::spawn_blocking(move || {
        Command::new(&program)
            .args(&args)
            .current_dir(&dir)
            .env("NODE_PATH", frameworks().join("node_modules"))
            .output()
            .expect("run the example")
    });
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the example finished in two minutes")
        .expect("example task");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(
        output.status.success(),
        "example failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

/// Everything Redis publishes while it runs, seen around redcloak.
struct Published {
    task: tokio::task::JoinHandle<Vec<u8>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Published {
    async fn watch(redis: &TestRedis) -> Published {
        let mut direct = redis.admin().await;
        assert!(direct.call(&[b"PSUBSCRIBE", b"*"]).await.starts_with(b"*3"));
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return seen,
                    message = direct.read_or_eof() => match message {
                        Some(message) => seen.extend_from_slice(&message),
                        None => return seen,
                    },
                }
            }
        });
        Published { task, stop }
    }

    async fn all(self) -> Vec<u8> {
        self.stop.cancel();
        self.task.await.expect("watcher")
    }
}

async fn proxy_for(redis: &TestRedis, framework: &str) -> Proxy {
    redis
        .start_proxy(&redis.config().tail(&documented_rules(framework)))
        .await
}

/// Redis neither stores nor published any of `needles` in clear.
async fn assert_no_plaintext(redis: &TestRedis, published: &[u8], needles: &[&[u8]]) {
    redis.assert_holds_no_plaintext(needles).await;
    for needle in needles {
        assert!(
            !published.windows(needle.len()).any(|w| w == *needle),
            "Redis published {} in clear",
            String::from_utf8_lossy(needle)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_runs_a_task_with_its_arguments_and_result_encrypted() {
    let redis = TestRedis::start().await;
    let proxy = proxy_for(&redis, "Celery").await;
    let published = Published::watch(&redis).await;
    let python = frameworks().join("venv/bin/python");
    let url = format!("redis://{}/0", proxy.addr());
    let out = run_example(python, vec!["celery_example.py".into(), url]).await;
    assert!(
        out.contains("result CELERY-ARG-SECRET celery-arg-secret"),
        "{out}"
    );
    let published = published.all().await;
    assert!(!published.is_empty(), "the result was published");
    let needles: &[&[u8]] = &[
        b"celery-arg-secret",
        b"CELERY-ARG-SECRET",
        b"celery-parked-secret",
    ];
    assert_no_plaintext(&redis, &published, needles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rq_runs_a_job_with_its_arguments_and_result_encrypted() {
    let redis = TestRedis::start().await;
    let proxy = proxy_for(&redis, "RQ").await;
    let published = Published::watch(&redis).await;
    let python = frameworks().join("venv/bin/python");
    let url = format!("redis://{}/0", proxy.addr());
    let out = run_example(python, vec!["rq_example.py".into(), url]).await;
    assert!(out.contains("result RQ-ARG-SECRET rq-arg-secret"), "{out}");
    let needles: &[&[u8]] = &[b"rq-arg-secret", b"RQ-ARG-SECRET", b"rq-parked-secret"];
    let published = published.all().await;
    assert_no_plaintext(&redis, &published, needles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huey_passes_its_storage_tests_with_tasks_and_results_encrypted() {
    // Huey asks INFO for the server's version (HEXPIRE needs 7.4).
    let redis = TestRedis::start_with(RedisSetup {
        acl: Some(format!("{LEAST_PRIVILEGE} +info")),
        ..RedisSetup::default()
    })
    .await;
    let proxy = proxy_for(&redis, "Huey").await;
    let published = Published::watch(&redis).await;
    let python = frameworks().join("venv/bin/python");
    let out = run_example(
        python,
        vec!["huey_example.py".into(), proxy.addr().to_string()],
    )
    .await;
    assert!(out.contains("huey storage tests passed"), "{out}");
    let needles: &[&[u8]] = &[
        b"huey-queued-secret",
        b"huey-scheduled-secret",
        b"huey-result-secret",
    ];
    let published = published.all().await;
    assert_no_plaintext(&redis, &published, needles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_broadcasts_between_two_servers_with_messages_encrypted() {
    let redis = TestRedis::start().await;
    let proxy = proxy_for(&redis, "Socket.IO").await;
    let published = Published::watch(&redis).await;
    let url = format!("redis://{}", proxy.addr());
    let out = run_example(
        PathBuf::from("node"),
        vec!["socketio_example.js".into(), url],
    )
    .await;
    assert!(
        out.contains("received socketio-broadcast-secret sockets 1"),
        "{out}"
    );
    let published = published.all().await;
    assert!(
        published.windows(9).any(|w| w == b"socket.io"),
        "the adapter published through Redis"
    );
    let needles: &[&[u8]] = &[b"socketio-broadcast-secret"];
    assert_no_plaintext(&redis, &published, needles).await;
}

/// The connect handshakes of real clients keep them on the shared lanes:
/// redis-py 8 (RESP2: CLIENT SETINFO twice; RESP3: HELLO 3 and SETINFO),
/// node-redis 5 (SETINFO) and ioredis 6 (HELLO 3, SETINFO, INFO) are never
/// pinned; Redis sees one connection from redcloak per protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_libraries_handshakes_keep_them_on_the_lane() {
    let redis = TestRedis::start().await;
    let config = redis
        .config()
        .upstream("lanes", "1")
        .tail("[metrics]\naddress = \"127.0.0.1:0\"\n");
    let proxy = redis.start_proxy(&config).await;
    let port = proxy.addr().port().to_string();
    let python = frameworks().join("venv/bin/python");
    let node = PathBuf::from("node");
    let runs: [(&PathBuf, [&str; 3], bool); 4] = [
        (&python, ["handshakes.py", &port, "2"], false),
        (&node, ["handshakes.js", &port, "node-redis"], false),
        (&python, ["handshakes.py", &port, "3"], false),
        (&node, ["handshakes.js", &port, "ioredis"], false),
    ];
    let mut pins = 0.0;
    for (program, args, pinned) in runs {
        let out = run_example(program.clone(), args.map(String::from).to_vec()).await;
        assert!(out.contains("ok"), "{args:?}: {out}");
        pins += if pinned { 1.0 } else { 0.0 };
        let metrics = proxy.scrape().await;
        assert_eq!(
            metric(&metrics, "redcloak_client_pins_total"),
            Some(pins),
            "{args:?}"
        );
    }
    // One RESP2 lane, one RESP3 lane.
    let metrics = proxy.scrape().await;
    assert_eq!(metric(&metrics, "redcloak_upstream_lanes_open"), Some(2.0));
    let metrics = proxy.scrape().await;
    let setinfo = metric(
        &metrics,
        "redcloak_commands_total{command=\"client\",outcome=\"redis_error\"}",
    );
    // Redis 7.0 refuses SETINFO; the clients carried on regardless.
    assert!(setinfo >= Some(3.0), "{setinfo:?}");
}
