#!/usr/bin/env bash
# Do large replies stall small ones? 64-byte GETs (50 clients, pipeline 1)
# measured while BIG_CLIENTS other clients read large replies in a loop
# (GET of a BIG_BYTES value, or HGETALL of a hash of HASH_FIELDS fields),
# against direct TLS Redis (b) and redcloak (release build) with each
# BENCH_LANES setting in LANE_SETTINGS. Usage, from the repo root:
#   cargo build --release
#   ROUNDS=3 scripts/bench-large-replies.sh /tmp/large-out
# Prints one line per (target, background) with the median over ROUNDS of
# requests/s, p50 and p99 (ms) of the small GETs, and the large replies/s.
set -euo pipefail
out="${1:?usage: bench-large-replies.sh OUT_DIR}"
root="$(cd "$(dirname "$0")/.." && pwd)"
rounds="${ROUNDS:-3}"
big_bytes="${BIG_BYTES:-4194304}"
hash_fields="${HASH_FIELDS:-20000}"
big_clients="${BIG_CLIENTS:-2}"
small_n="${SMALL_N:-100000}"
lane_settings="${LANE_SETTINGS:-0 1}"
mkdir -p "$out"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

export CERT_DIR="$work/certs" REDIS_PASSWORD="bench-$(openssl rand -hex 12)"
export REDIS_TLS_PORT="${REDIS_TLS_PORT:-7391}" PROXY_PORT="${PROXY_PORT:-7392}"
"$root/../shared/bench/setup-certs.sh" "$CERT_DIR" >/dev/null
cat >"$work/redis.conf" <<CONF
port 0
tls-port $REDIS_TLS_PORT
tls-cert-file $CERT_DIR/server.crt
tls-key-file $CERT_DIR/server.key
tls-ca-cert-file $CERT_DIR/ca.crt
tls-auth-clients yes
requirepass $REDIS_PASSWORD
save ""
appendonly no
dir $work
CONF
redis-server "$work/redis.conf" >"$out/redis.log" 2>&1 &
pids+=($!)
tls=(--tls --cacert "$CERT_DIR/ca.crt" --cert "$CERT_DIR/client.crt" --key "$CERT_DIR/client.key")
direct=(-p "$REDIS_TLS_PORT" "${tls[@]}" -a "$REDIS_PASSWORD")
# redcloak's keys in database 1, apart from the plaintext ones direct wrote.
proxied_cli=(-p "$PROXY_PORT" -n 1)
proxied_bench=(-p "$PROXY_PORT" --dbnum 1)
for _ in $(seq 50); do
    redis-cli --no-auth-warning "${direct[@]}" ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
done

load() { # $@: redis-cli connection args
    python3 -c 'import base64, os, sys; n = int(sys.argv[1]); sys.stdout.write(base64.b64encode(os.urandom(n)).decode()[:n])' \
        "$big_bytes" >"$work/big"
    redis-cli --no-auth-warning "$@" -x SET big <"$work/big" >/dev/null
    redis-cli --no-auth-warning "$@" DEL bighash >/dev/null
    for start in $(seq 0 1000 $((hash_fields - 1))); do
        args=()
        for i in $(seq "$start" $((start + 999))); do args+=("f$i" "value-$i-$(printf '%040d' "$i")"); done
        redis-cli --no-auth-warning "$@" HSET bighash "${args[@]}" >/dev/null
    done
}

# One round: background readers of large replies, small GETs measured.
round() { # $1 background (none|get|hgetall), rest: redis-benchmark connection args
    local background="$1"
    shift
    local bg=""
    case "$background" in
        get) bg="GET big" ;;
        hgetall) bg="HGETALL bighash" ;;
    esac
    local bg_pid=""
    if [[ -n "$bg" ]]; then
        # shellcheck disable=SC2086
        redis-benchmark "$@" -c "$big_clients" -n 100000000 -q --csv $bg \
            >"$work/bg.csv" 2>/dev/null &
        bg_pid=$!
        sleep 1
    fi
    local started=$SECONDS
    redis-benchmark "$@" -c 50 -P 1 -n "$small_n" -r 100000 -d 64 -t get --csv \
        2>/dev/null | tail -1
    local took=$((SECONDS - started))
    if [[ -n "$bg_pid" ]]; then
        kill "$bg_pid" 2>/dev/null || true
        wait "$bg_pid" 2>/dev/null || true
    fi
    echo "seconds=$took"
}

# How many times Redis has run a command so far.
calls() {
    redis-cli --no-auth-warning "${direct[@]}" INFO commandstats | tr -d '\r' \
        | grep -E "^cmdstat_$1:" | sed -E 's/^[^:]*:calls=([0-9]+),.*/\1/' || echo 0
}
summary="$out/summary.txt"
: >"$summary"
measure() { # $1 label, rest: redis-benchmark args
    local label="$1"
    shift
    for background in none get hgetall; do
        for r in $(seq "$rounds"); do
            local stat=get
            [[ $background == hgetall ]] && stat=hgetall
            local before after
            before=$(calls "$stat")
            round "$background" "$@" >"$work/round.out"
            after=$(calls "$stat")
            local csv seconds
            csv=$(grep '^"GET' "$work/round.out" | tail -1)
            seconds=$(grep '^seconds=' "$work/round.out" | cut -d= -f2)
            echo "$label $background $r $csv calls=$((${after:-0} - ${before:-0})) seconds=$seconds" \
                | tee -a "$out/rounds.txt"
        done
    done
}

load "${direct[@]}"
measure direct "${direct[@]}"
for lanes in $lane_settings; do
    BENCH_LANES="$lanes" BENCH_METRICS=0 "$root/scripts/bench-proxy.sh" >"$out/proxy-$lanes.log" 2>&1 &
    proxy_pid=$!
    pids+=("$proxy_pid")
    for _ in $(seq 100); do
        redis-cli -p "$PROXY_PORT" ping 2>/dev/null | grep -q PONG && break
        sleep 0.1
    done
    load "${proxied_cli[@]}"
    measure "lanes=$lanes" "${proxied_bench[@]}"
    kill "$proxy_pid"
    wait "$proxy_pid" 2>/dev/null || true
done
SMALL_N="$small_n" python3 - "$out/rounds.txt" <<'PY' | tee "$summary"
import csv, os, statistics, sys
small_n = int(os.environ["SMALL_N"])
rows = {}
for line in open(sys.argv[1]):
    label, background, _round, rest = line.split(" ", 3)
    fields = next(csv.reader([rest.split(" calls=")[0]]))
    calls = int(rest.split("calls=")[1].split()[0])
    seconds = int(rest.split("seconds=")[1].split()[0]) or 1
    rps, p50, p99 = float(fields[1]), float(fields[4]), float(fields[6])
    big = calls / seconds if background != "none" else 0
    if background == "get":
        big = max(0, calls - small_n) / seconds  # the small GETs count there too
    rows.setdefault((label, background), []).append((rps, p50, p99, big))
print(f"{'target':<10} {'background':<9} {'small GET/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'large/s':>8}")
for (label, background), values in rows.items():
    med = [statistics.median(v[i] for v in values) for i in range(4)]
    print(f"{label:<10} {background:<9} {med[0]:>11.0f} {med[1]:>7.3f} {med[2]:>7.3f} {med[3]:>8.1f}")
PY
