#!/usr/bin/env bash
# Starts spillway (release build of this tree) in front of its own sample app, sends traffic
# that exercises every metric family, and asks promtool to lint the exposition. Installs
# promtool (Debian package prometheus) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=SCRIPTDIR/../scripts/lib.sh
source scripts/lib.sh
need_tool promtool prometheus
cargo build --release -q
bin=target/release/spillway
work=$(mktemp -d)
trap 'stop_demo TERM || true; rm -rf "$work"' EXIT

start_demo "$bin" "$work"
for path in /ok /status/500 /broken '/slow?ms=1500' /nope; do
  curl -s -o /dev/null "http://127.0.0.1:$proxy$path" || true
done
curl -s -o /dev/null -X BREW "http://127.0.0.1:$proxy/ok" || true
curl -fsS "http://127.0.0.1:$admin/metrics" > "$work/metrics.txt"
grep -c '^spillway_' "$work/metrics.txt" | sed 's/^/series: /'
out=$(promtool check metrics < "$work/metrics.txt" 2>&1) || { echo "$out"; exit 1; }
if [ -n "$out" ]; then echo "promtool found problems:"; echo "$out"; exit 1; fi
echo "promtool check metrics: clean"
