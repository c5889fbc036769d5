//! Criterion benches of the hot paths redcloak owns: sealing and opening a
//! value, and a SET request from bytes to its sealed upstream form.
//! `cargo bench --bench hot_paths`; results go in the closing notes and
//! docs/envelope.md.

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redcloak::auth::ClientAuth;
use redcloak::crypto::{Binding, Keyring, LegacyPlaintext};
use redcloak::policy::rules::Rules;
use redcloak::policy::{Policy, UnknownCommands};
use redcloak::resp::{self, Limits, RequestParser};
use std::hint::black_box;
use std::sync::Arc;
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
    let binding = Binding {
        key: Some(b"sessions:3f2a9c"),
        field: None,
    };
    let mut group = c.benchmark_group("envelope");
    for (name, size) in SIZES {
        let value = vec![0x5Au8; size];
        let sealed = ring.seal(&value, binding);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("seal", name), &value, |b, v| {
            b.iter(|| ring.seal(black_box(v), binding))
        });
        group.bench_with_input(BenchmarkId::new("open", name), &sealed, |b, s| {
            b.iter(|| ring.open(black_box(s), binding).expect("opens"))
        });
    }
    group.finish();
}

fn classify_and_seal_set(c: &mut Criterion) {
    let policy = Policy::new(
        ClientAuth::new(None),
        Rules::default(),
        Arc::new(keyring()),
        UnknownCommands::Refuse,
    );
    let mut group = c.benchmark_group("request");
    for (name, size) in SIZES.into_iter().take(2) {
        let mut frame = BytesMut::new();
        resp::encode_command(
            &mut frame,
            &[&b"SET"[..], b"sessions:3f2a9c", &vec![0x5A; size]],
        );
        let frame = frame.freeze();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(
            BenchmarkId::new("parse_classify_seal_encode_SET", name),
            |b| {
                let mut out = BytesMut::with_capacity(size + 256);
                b.iter(|| {
                    let mut input = BytesMut::from(&frame[..]);
                    let request = RequestParser::default()
                        .next(&mut input, &Limits::default())
                        .expect("valid")
                        .expect("complete");
                    let mut state = policy.new_connection();
                    if let redcloak::policy::Action::Rewrite(args, _) =
                        policy.classify(&request, &mut state)
                    {
                        out.clear();
                        resp::encode_command(&mut out, &args);
                    }
                    black_box(&out);
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, seal_and_open, classify_and_seal_set);
criterion_main!(benches);
