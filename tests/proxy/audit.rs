//! The tamper-evident audit log, written by `redcloak serve` processes:
//! security events land in it as chained lines; a restart starts a linked
//! segment; `redcloak audit verify` passes the log as written and names
//! the first bad entry after an edit, a deletion or a reordering, and a
//! log cut short after a checkpoint the normal log shows fails against it.

use crate::support::*;
use std::path::Path;
use std::process::Command;

/// `redcloak audit verify`: exit code and what it printed.
fn verify(dir: &Path, files: &[&Path], checkpoint: Option<&str>) -> (i32, String) {
    let mut command = Command::new(redcloak_bin());
    command
        .args(["audit", "verify", "--key-file"])
        .arg(dir.join("audit-key"));
    if let Some(checkpoint) = checkpoint {
        command.args(["--checkpoint", checkpoint]);
    }
    let output = command.args(files).output().expect("redcloak runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// The last "audit checkpoint" in a serve child's JSON logs, as
/// `SEGMENT:SEQ:MAC`.
fn last_checkpoint(logs: &str) -> Option<String> {
    logs.lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["fields"]["message"] == "audit checkpoint")
        .map(|line| {
            let f = &line["fields"];
            format!(
                "{}:{}:{}",
                f["segment"],
                f["seq"],
                f["mac"].as_str().unwrap_or_default()
            )
        })
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_chains_events_across_restarts_and_shows_tampering() {
    let redis = TestRedis::start().await;
    let audit_key = redcloak::crypto::keyring::generate_key();
    redcloak::dev::write_file(&redis.path("audit-key"), audit_key.as_bytes(), 0o600)
        .expect("audit key");
    let config = redis
        .config()
        .tail(&redis.listen_auth("a client password that is long enough", ""))
        .tail("[audit]\nfile = \"audit.jsonl\"\nkey_file = \"audit-key\"\ncheckpoint_every = \"200ms\"\n");
    let file = redis.path("redcloak.toml");
    std::fs::write(&file, config.render()).expect("config");
    let audit = redis.path("audit.jsonl");

    // First run: failed logins and a refused command are security events.
    let serving = ServeChild::start(&file).await;
    let mut c = serving.raw().await;
    for _ in 0..3 {
        let reply = c.call(&[b"AUTH", b"wrong guess 42"]).await;
        assert!(reply.starts_with(b"-WRONGPASS"), "{reply:?}");
    }
    let reply = c
        .call(&[b"AUTH", b"a client password that is long enough"])
        .await;
    assert_reply(&reply, b"+OK\r\n");
    let refused = c.call(&[b"SORT", b"k", b"BY", b"w_*"]).await;
    assert!(refused.starts_with(b"-ERR redcloak"), "{refused:?}");
    eventually("a checkpoint after the events", || async {
        last_checkpoint(&serving.logs()).is_some_and(|c| !c.starts_with("0:0:"))
            && std::fs::read_to_string(&audit).is_ok_and(|t| t.lines().count() >= 5)
    })
    .await;
    serving.signal("-TERM");
    let (code, _) = serving.exit_code().await;
    assert_eq!(code, 0);

    // Second run: a new segment, linked to the first.
    let serving = ServeChild::start(&file).await;
    let mut c = serving.raw().await;
    let reply = c.call(&[b"AUTH", b"wrong again"]).await;
    assert!(reply.starts_with(b"-WRONGPASS"), "{reply:?}");
    eventually("the second segment's event", || async {
        std::fs::read_to_string(&audit).is_ok_and(|t| t.contains("\"segment\":1,\"seq\":1,"))
    })
    .await;
    serving.signal("-TERM");
    let (code, logs) = serving.exit_code().await;
    assert_eq!(code, 0);
    let checkpoint = last_checkpoint(&logs).expect("a checkpoint at exit");

    let text = std::fs::read_to_string(&audit).expect("audit log");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("\"event\":\"segment_start\""),
        "{}",
        lines[0]
    );
    assert_eq!(
        text.matches("\"event\":\"client_auth_failure\"").count(),
        4,
        "{text}"
    );
    assert!(text.contains("\"event\":\"command_refused\""), "{text}");
    assert!(
        !text.contains("wrong guess"),
        "no password in the audit log"
    );
    let (code, out) = verify(&redis.path(""), &[&audit], Some(&checkpoint));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("in 2 segments"), "{out}");

    // Tampering: each one is named by its line.
    let tampered = redis.path("tampered.jsonl");
    let attempt = |lines: Vec<String>| {
        std::fs::write(&tampered, lines.join("\n") + "\n").expect("write");
        verify(&redis.path(""), &[&tampered], None)
    };
    let owned: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let mut edited = owned.clone();
    edited[2] = edited[2].replacen("client_auth_failure", "client_auth_success", 1);
    let (code, out) = attempt(edited);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("tampered.jsonl:3") && out.contains("MAC does not match"),
        "{out}"
    );
    let mut deleted = owned.clone();
    deleted.remove(2);
    let (code, out) = attempt(deleted);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("tampered.jsonl:3"), "{out}");
    let mut reordered = owned.clone();
    reordered.swap(1, 2);
    let (code, out) = attempt(reordered);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("tampered.jsonl:2"), "{out}");
    // Cut short: the chain alone cannot tell, the checkpoint can.
    let cut = owned[..owned.len() - 1].to_vec();
    let (code, _) = attempt(cut.clone());
    assert_eq!(code, 0, "a cut end keeps the chain whole");
    std::fs::write(&tampered, cut.join("\n") + "\n").expect("write");
    let (code, out) = verify(&redis.path(""), &[&tampered], Some(&checkpoint));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("truncated"), "{out}");
}
