#!/usr/bin/env bash
# PROXY_CMD for ../shared/bench/anchors.sh: redcloak (release build, built
# beforehand with `cargo build --release`) on 127.0.0.1:$PROXY_PORT in front
# of the harness's TLS Redis (b), values encrypted. Usage, from the repo root:
#   cargo build --release
#   REPS=3 CONFIGS="b c e" PROXY_CMD="$PWD/scripts/bench-proxy.sh" PROXY_BENCH_ARGS="--dbnum 1" \
#     ../shared/bench/anchors.sh /tmp/bench-out
# --dbnum 1 keeps redcloak's keys apart from the plaintext values (b) and (c)
# write: read through redcloak, those are legacy plaintext and answer errors.
# The harness's Redis uses requirepass (the admin-capable default user) and
# short-lived throwaway files, so the startup checks run in the development
# profile, where those are warnings. Nothing about TLS or AUTH is relaxed.
# Metrics are on, as in production (admin listener on an ephemeral port);
# BENCH_METRICS=0 leaves them off, to measure what they cost.
set -euo pipefail
: "${PROXY_PORT:?}" "${REDIS_TLS_PORT:?}" "${CERT_DIR:?}" "${REDIS_PASSWORD:?}"
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release/redcloak"
dir="$(dirname "$CERT_DIR")/redcloak.$PROXY_PORT"
mkdir -p "$dir"
umask 077
printf '%s' "$REDIS_PASSWORD" >"$dir/redis-password"
"$bin" keygen >"$dir/key-1" 2>/dev/null
cat >"$dir/redcloak.toml" <<CONF
profile = "development"

[listen]
address = "127.0.0.1:$PROXY_PORT"
max_connections = 20000
# Every load client connects from 127.0.0.1.
max_connections_per_peer = 20000

[upstream]
address = "${REDIS_HOST:-127.0.0.1}:$REDIS_TLS_PORT"
server_name = "localhost"
ca = "$CERT_DIR/ca.crt"
cert = "$CERT_DIR/client.crt"
key = "$CERT_DIR/client.key"
password_file = "redis-password"
# Product defaults, unless overridden: BENCH_POOL_IDLE (upstream.pool_idle),
# BENCH_LANES (upstream.lanes; 0 gives every client its own connection, the
# design before lanes), BENCH_RELEASE_IDLE_AFTER (upstream.release_idle_after).
${BENCH_POOL_IDLE:+pool_idle = $BENCH_POOL_IDLE}
${BENCH_LANES:+lanes = $BENCH_LANES}
${BENCH_RELEASE_IDLE_AFTER:+release_idle_after = \"$BENCH_RELEASE_IDLE_AFTER\"}

[encryption]
primary = 1
[[encryption.keys]]
id = 1
file = "key-1"
CONF
if [[ "${BENCH_METRICS:-1}" != 0 ]]; then
    printf '\n[metrics]\naddress = "127.0.0.1:0"\n' >>"$dir/redcloak.toml"
fi
exec "$bin" serve --config "$dir/redcloak.toml"
