#!/usr/bin/env bash
# Starts spillway (release build of this tree) in front of its own sample app, sends traffic
# that exercises every metric family, and asks promtool to lint the exposition.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
bin=target/release/spillway
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

# Ports chosen by the kernel: bind-and-release is racy, so retry a few times.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for attempt in 1 2 3; do
  proxy=$(free_port); admin=$(free_port)
  sed -e "s/127.0.0.1:8080/127.0.0.1:$proxy/" -e "s/127.0.0.1:9901/127.0.0.1:$admin/" \
      -e 's/drain_delay: .*/drain_delay: 0s/' config/demo.yaml > "$work/spillway.yaml"
  RUST_LOG=warn timeout 120 "$bin" demo --config "$work/spillway.yaml" >"$work/out.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 50); do
    curl -fsS "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1 && break
    sleep 0.2
  done
  if curl -fsS "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1; then break; fi
  kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
done
for path in /ok /status/500 /broken '/slow?ms=1500' /nope; do
  curl -s -o /dev/null "http://127.0.0.1:$proxy$path" || true
done
curl -s -o /dev/null -X BREW "http://127.0.0.1:$proxy/ok" || true
curl -fsS "http://127.0.0.1:$admin/metrics" > "$work/metrics.txt"
grep -c '^spillway_' "$work/metrics.txt" | sed 's/^/series: /'
out=$(promtool check metrics < "$work/metrics.txt" 2>&1) || { echo "$out"; exit 1; }
if [ -n "$out" ]; then echo "promtool found problems:"; echo "$out"; exit 1; fi
echo "promtool check metrics: clean"
