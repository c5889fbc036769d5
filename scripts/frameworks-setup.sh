#!/usr/bin/env bash
# Installs the frameworks tests/proxy/frameworks.rs drives, from PyPI and
# npm, into target/frameworks (a Python venv and node_modules), once per
# version of tests/frameworks/{requirements.txt,package-lock.json}.
# Prints the folder. Any failure is an error: the tests never skip.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
spec="$root/tests/frameworks"
dir="${CARGO_TARGET_DIR:-$root/target}/frameworks"
stamp="$(cat "$spec/requirements.txt" "$spec/package-lock.json" | sha256sum | cut -c1-16)"
if [ -f "$dir/ready-$stamp" ]; then
    echo "$dir"
    exit 0
fi
rm -rf "$dir"
mkdir -p "$dir"
python3 -m venv "$dir/venv" >&2
"$dir/venv/bin/pip" install --quiet --disable-pip-version-check -r "$spec/requirements.txt" >&2
cp "$spec/package.json" "$spec/package-lock.json" "$dir/"
(cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
touch "$dir/ready-$stamp"
echo "$dir"
