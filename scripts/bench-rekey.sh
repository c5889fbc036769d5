#!/usr/bin/env bash
# `redcloak rekey` on ~100,000 keys (release build), and a concurrent app's
# GETs through redcloak (50 clients, pipeline 1) alone and during the rekey.
# Usage, from the repo root (REKEY_ARGS adds options, e.g. "--rate 20000"):
#   cargo build --release && scripts/bench-rekey.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work=$(mktemp -d)
export CERT_DIR=$work/certs REDIS_PASSWORD=password-$RANDOM-$RANDOM-$RANDOM REDIS_TLS_PORT=7781 PROXY_PORT=7782
$root/../shared/bench/setup-certs.sh $CERT_DIR >/dev/null 2>&1
redis-server --port 0 --tls-port $REDIS_TLS_PORT --tls-cert-file $CERT_DIR/server.crt --tls-key-file $CERT_DIR/server.key --tls-ca-cert-file $CERT_DIR/ca.crt --tls-auth-clients yes --requirepass $REDIS_PASSWORD --save "" >/dev/null 2>&1 &
rpid=$!; ppid=; trap "kill \$rpid \$ppid 2>/dev/null; rm -rf $work" EXIT
sleep 0.5
BENCH_METRICS=0 $root/scripts/bench-proxy.sh > $work/proxy.log 2>&1 &
ppid=$!
for _ in $(seq 100); do redis-cli -p $PROXY_PORT ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
dir=$(dirname $CERT_DIR)/redcloak.$PROXY_PORT
# 100,000 strings of 64 bytes, sealed with key 1, in database 0.
redis-benchmark -p $PROXY_PORT -c 50 -P 16 -t set -d 64 -n 400000 -r 100000 -q >/dev/null 2>&1
keys=$(redis-cli --no-auth-warning -p $REDIS_TLS_PORT --tls --cacert $CERT_DIR/ca.crt --cert $CERT_DIR/client.crt --key $CERT_DIR/client.key -a $REDIS_PASSWORD dbsize)
echo "keys in Redis: $keys"
$root/target/release/redcloak keygen > $dir/key-2 2>/dev/null; chmod 600 $dir/key-2
sed -e 's/^primary = 1/primary = 2/' $dir/redcloak.toml > $dir/rekey.toml
printf '[[encryption.keys]]\nid = 2\nfile = "key-2"\n' >> $dir/rekey.toml
# The proxies learn key 2 first (a reload), so they open what rekey seals with it.
cp $dir/redcloak.toml $dir/proxy-before.toml
printf '[[encryption.keys]]\nid = 2\nfile = "key-2"\n' >> $dir/redcloak.toml
kill -HUP $ppid; sleep 1
app() { redis-benchmark -p $PROXY_PORT -c 50 -P 1 -t get -d 64 -n ${1:-200000} -r 100000 --csv 2>/dev/null | tail -1; }
echo "app alone: $(app)"
echo "app alone: $(app)"
start=$(date +%s.%N)
( $root/target/release/redcloak rekey --config $dir/rekey.toml ${REKEY_ARGS:-} > $work/census.json 2> $work/rekey.err; date +%s.%N > $work/rekey.end ) &
rk=$!
echo "app during rekey: $(app 40000)"
wait $rk
end=$(cat $work/rekey.end)
echo "rekey alone-ish: $(python3 -c "print(round($end-$start,2))") s; census: $(cat $work/census.json | head -c 300)"
# Second run: nothing to do (census of a finished job), then rekey back to key 1 with no app load.
start=$(date +%s.%N)
$root/target/release/redcloak rekey --config $dir/rekey.toml --to-key 1 > $work/census2.json 2>/dev/null
end=$(date +%s.%N)
echo "rekey back to key 1, no app load: $(python3 -c "print(round($end-$start,2))") s; $(head -c 200 $work/census2.json)"
