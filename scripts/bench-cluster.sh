#!/usr/bin/env bash
# Throughput across a 3-primary TLS Redis Cluster: redis-benchmark --cluster
# --tls straight to the nodes (mutual TLS, AUTH), against redis-benchmark
# (plaintext, cluster-unaware) through redcloak, which routes per slot and
# seals every value. SET and GET, 64 B, 50 clients, random keys over every
# slot, pipeline 1 and 16, ROUNDS rounds interleaved; prints the medians and
# the ratio of redcloak to direct per workload.
# Usage, from the repo root:
#   cargo build --release && ROUNDS=3 scripts/bench-cluster.sh
# BENCH_LANES=N sets upstream.lanes (default: the product default).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release/redcloak"
rounds=${ROUNDS:-3}
requests=${REQUESTS:-200000}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
certs=$work/certs
"$root/../shared/bench/setup-certs.sh" "$certs" >/dev/null 2>&1
password=password-$RANDOM-$RANDOM-$RANDOM
tls=(--tls --cacert "$certs/ca.crt" --cert "$certs/client.crt" --key "$certs/client.key")
ports=()
for n in 0 1 2; do
    port=$((17100 + n))
    mkdir -p "$work/node-$n"
    redis-server --port 0 --tls-port "$port" --bind 127.0.0.1 \
        --tls-cert-file "$certs/server.crt" --tls-key-file "$certs/server.key" \
        --tls-ca-cert-file "$certs/ca.crt" --tls-auth-clients yes \
        --tls-cluster yes --tls-replication yes \
        --tls-client-cert-file "$certs/client.crt" --tls-client-key-file "$certs/client.key" \
        --cluster-enabled yes --cluster-config-file "$work/node-$n/nodes.conf" \
        --cluster-port $((17200 + n)) --requirepass "$password" --masterauth "$password" \
        --save "" --appendonly no --dir "$work/node-$n" >"$work/node-$n/log" 2>&1 &
    pids+=($!)
    ports+=("$port")
done
sleep 1
redis-cli "${tls[@]}" -a "$password" --no-auth-warning --cluster create \
    127.0.0.1:${ports[0]} 127.0.0.1:${ports[1]} 127.0.0.1:${ports[2]} --cluster-yes >"$work/create.log" 2>&1
for _ in $(seq 100); do
    redis-cli "${tls[@]}" -a "$password" --no-auth-warning -p "${ports[0]}" cluster info 2>/dev/null |
        grep -q cluster_state:ok && break
    sleep 0.1
done

proxy_port=17300
dir=$work/redcloak
mkdir -p "$dir"
(umask 077; printf '%s' "$password" >"$dir/redis-password"; "$bin" keygen >"$dir/key-1" 2>/dev/null)
cat >"$dir/redcloak.toml" <<CONF
# The nodes use requirepass (the admin-capable default user): a warning in
# the development profile. Nothing about TLS or AUTH is relaxed.
profile = "development"

[listen]
address = "127.0.0.1:$proxy_port"
max_connections = 20000
max_connections_per_peer = 20000

[upstream]
cluster = { seeds = ["127.0.0.1:${ports[0]}"] }
server_name = "localhost"
ca = "$certs/ca.crt"
cert = "$certs/client.crt"
key = "$certs/client.key"
password_file = "redis-password"
${BENCH_LANES:+lanes = $BENCH_LANES}

[encryption]
primary = 1
[[encryption.keys]]
id = 1
file = "key-1"
CONF
"$bin" serve --config "$dir/redcloak.toml" >"$dir/log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    redis-cli -p $proxy_port ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
done

results=$work/results.csv
echo "round,target,pipeline,test,rps" >"$results"
run() { # target pipeline args...
    local target=$1 pipeline=$2
    shift 2
    redis-benchmark "$@" -t set,get -d 64 -c 50 -r 1000000 -n "$requests" -P "$pipeline" --csv 2>/dev/null |
        grep -E '^"(SET|GET)"' | tr -d '"' | while IFS=, read -r test rps _; do
            echo "$round,$target,$pipeline,$test,$rps"
        done >>"$results"
}
# BENCH_PIPELINES and BENCH_TARGETS narrow a run (e.g. to profile one).
for round in $(seq "$rounds"); do
    for pipeline in ${BENCH_PIPELINES:-1 16}; do
        for target in ${BENCH_TARGETS:-direct redcloak}; do
            case $target in
            direct) run direct "$pipeline" --cluster -h 127.0.0.1 -p "${ports[0]}" "${tls[@]}" -a "$password" ;;
            redcloak) run redcloak "$pipeline" -h 127.0.0.1 -p $proxy_port ;;
            esac
        done
    done
done
[[ -n "${BENCH_DEBUG:-}" ]] && cat "$results" "$dir/log" >&2
python3 - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
by = {}
for r in rows:
    by.setdefault((r["test"], r["pipeline"], r["target"]), []).append(float(r["rps"]))
print("| workload | direct --cluster --tls | redcloak | ratio |")
print("|---|---:|---:|---:|")
for test in ("SET", "GET"):
    for pipeline in ("1", "16"):
        d = statistics.median(by.get((test, pipeline, "direct"), [0]))
        p = statistics.median(by.get((test, pipeline, "redcloak"), [0]))
        ratio = p / d if d else 0
        print(f"| {test} 64 B, P{pipeline} | {d/1000:.1f}k | {p/1000:.1f}k | {ratio:.2f}x |")
print(f"(medians of {len(by.get(('SET','1','direct'),[]))} rounds)")
PY
