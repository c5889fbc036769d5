//! Criterion benches of the hot paths redcloak owns: sealing and opening a
//! value; a SET request from bytes to its sealed upstream form; a GET reply
//! from upstream bytes to the plaintext reply the client gets; and both for
//! a pipeline of 16. `cargo bench --bench hot_paths`; results go in
//! docs/performance.md.

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redcloak::auth::ClientAuth;
use redcloak::crypto::{Binding, Keyring, LegacyPlaintext};
use redcloak::policy::rules::Rules;
use redcloak::policy::{Action, Policy, ReplyPlan, UnknownCommands};
use redcloak::resp::{self, Limits, ReplyScanner, RequestParser};
use redcloak::session::pipeline::{Entry, Replies};
use redcloak::session::seal;
use std::hint::black_box;
use zeroize::Zeroizing;

const SIZES: [(&str, usize); 3] = [("64B", 64), ("4KiB", 4096), ("1MiB", 1024 * 1024)];

fn keyring() -> Keyring {
    Keyring::new(
        1,
        vec![(1, Zeroizing::new([7; 32]))],
        LegacyPlaintext::Reject,
    )
    .expect("keyring")
}

fn seal_and_open(c: &mut Criterion) {
    let ring = keyring();
    let binding = Binding::string(b"sessions:3f2a9c");
    let mut group = c.benchmark_group("envelope");
    for (name, size) in SIZES {
        let value = vec![0x5Au8; size];
        let sealed = ring.seal(&value, binding).expect("primary");
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("seal", name), &value, |b, v| {
            b.iter(|| ring.seal(black_box(v), binding).expect("primary"))
        });
        group.bench_with_input(BenchmarkId::new("open", name), &sealed, |b, s| {
            b.iter(|| ring.open(black_box(s), binding).expect("opens"))
        });
    }
    group.finish();
}

fn policy() -> Policy {
    Policy::new(
        ClientAuth::new(None),
        Rules::default(),
        redcloak::crypto::CurrentKeyring::new(keyring()),
        UnknownCommands::Refuse,
    )
}

/// Every request in `input`, parsed, classified, sealed and encoded for Redis.
fn forward_all(policy: &Policy, mut input: BytesMut, out: &mut BytesMut) -> Vec<ReplyPlan> {
    let mut parser = RequestParser::default();
    let mut state = policy.new_connection();
    let mut plans = Vec::new();
    while let Some(request) = parser.next(&mut input, &Limits::default()).expect("valid") {
        match policy.classify(&request, &mut state) {
            Action::Rewrite(args, plan) => {
                resp::encode_command(out, &args);
                plans.push(plan);
            }
            Action::Forward(plan) => {
                resp::encode_command(out, &request.args);
                plans.push(plan);
            }
            Action::Seal(values, plan) => {
                let args = seal::arguments(&policy.keyring().load(), &request.args, &values)
                    .expect("primary");
                resp::encode_command(out, &args);
                plans.push(plan);
            }
            other => panic!("not forwarded: {other:?}"),
        }
    }
    plans
}

/// Every reply in `input` matched to its plan and opened for the client.
fn deliver_all(replies: &mut Replies, plans: &[ReplyPlan], input: &[u8], out: &mut BytesMut) {
    let mut scanner = ReplyScanner::default();
    let mut input = BytesMut::from(input);
    for plan in plans {
        replies.accept(Entry::Await(plan.clone(), None), out);
        let len = scanner
            .scan(&input, &Limits::default())
            .expect("valid")
            .expect("complete");
        let frame = input.split_to(len).freeze();
        replies.on_reply(frame, out).expect("expected reply");
    }
}

/// `count` GETs of sealed values of `size` bytes: the requests as a client
/// sends them, the plans, and the replies as Redis sends them.
fn gets(policy: &Policy, count: usize, size: usize) -> (Vec<ReplyPlan>, Vec<u8>) {
    let mut requests = BytesMut::new();
    let mut stored = BytesMut::new();
    for i in 0..count {
        let key = format!("sessions:{i}");
        resp::encode_command(&mut requests, &[b"GET", key.as_bytes()]);
        let sealed = policy
            .keyring()
            .load()
            .seal(&vec![0x5A; size], Binding::string(key.as_bytes()))
            .expect("primary");
        resp::encode_bulk(&mut stored, &sealed);
    }
    let plans = forward_all(policy, requests, &mut BytesMut::new());
    (plans, stored.to_vec())
}

fn open_get_replies(c: &mut Criterion) {
    let policy = policy();
    let mut group = c.benchmark_group("reply");
    for (count, label) in [(1, "open_GET_reply"), (16, "pipeline16_open_GET_replies")] {
        for (name, size) in SIZES.into_iter().take(2) {
            let (plans, stored) = gets(&policy, count, size);
            group.throughput(Throughput::Bytes((count * size) as u64));
            group.bench_function(BenchmarkId::new(label, name), |b| {
                let mut replies = Replies::new(
                    policy.keyring().clone(),
                    policy.rules().clone(),
                    Limits::default(),
                );
                let mut out = BytesMut::with_capacity(count * (size + 64));
                b.iter(|| {
                    out.clear();
                    deliver_all(&mut replies, &plans, black_box(&stored), &mut out);
                    black_box(&out);
                })
            });
        }
    }
    group.finish();
}

/// SETs from a client's bytes to their sealed form for Redis: one, and a
/// pipeline of 16.
fn forward_sets(c: &mut Criterion) {
    let policy = policy();
    let mut group = c.benchmark_group("request");
    for (count, label) in [
        (1, "parse_classify_seal_encode_SET"),
        (16, "pipeline16_SET"),
    ] {
        for (name, size) in SIZES.into_iter().take(2) {
            let mut input = BytesMut::new();
            for i in 0..count {
                let key = format!("sessions:{i}");
                resp::encode_command(
                    &mut input,
                    &[&b"SET"[..], key.as_bytes(), &vec![0x5A; size]],
                );
            }
            group.throughput(Throughput::Bytes((count * size) as u64));
            group.bench_function(BenchmarkId::new(label, name), |b| {
                let mut out = BytesMut::with_capacity(count * (size + 256));
                b.iter(|| {
                    out.clear();
                    let plans = forward_all(&policy, BytesMut::from(&input[..]), &mut out);
                    black_box((&out, plans));
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, seal_and_open, forward_sets, open_get_replies);
criterion_main!(benches);
