#!/usr/bin/env bash
# Starts spillway (release build of this tree) in front of its own sample app, sends traffic
# that exercises every metric family, and asks promtool to lint the exposition (each route's
# duration histograms have their own buckets: the shared ones plus the route's timeout). Then
# checks that every family src/metrics.rs declares is exposed (TLS errors need a TLS listener),
# that the demo's 504 (a 1.5 s
# answer against its 1 s route timeout) lands in the le="1" bucket, and that
# spillway_config_info names the version /config serves. Installs promtool (Debian package
# prometheus) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=SCRIPTDIR/../scripts/lib.sh
source scripts/lib.sh
need_tool promtool prometheus
[ -n "${SPILLWAY_BIN:-}" ] || cargo build --release -q
bin=${SPILLWAY_BIN:-target/release/spillway}
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
version=$(curl -fsS "http://127.0.0.1:$admin/config" | python3 -c 'import json, sys; print(json.load(sys.stdin)["version"])')
python3 - "$work/metrics.txt" src/metrics.rs "$version" <<'EOF'
import re, sys
text, source, version = open(sys.argv[1]).read(), open(sys.argv[2]).read(), sys.argv[3]
declared = set(re.findall(r'pub const [A-Z_]+: &str = "(spillway_[a-z_]+)"', source))
exposed = set(re.findall(r"^# TYPE (spillway_[a-z_]+) ", text, re.M))
# Only a TLS listener has handshake errors to count; the demo has none.
missing = sorted(declared - exposed - {"spillway_tls_handshake_errors_total"})
assert not missing, f"declared in src/metrics.rs, not exposed: {missing}"
def value(series):
    m = re.search("^" + re.escape(series) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else None
assert value('spillway_request_duration_seconds_bucket{code="504",route="slow",le="1"}') == 1, \
    "the 504 at the 1 s route timeout is not in the le=\"1\" bucket"
assert value('spillway_request_duration_seconds_bucket{code="504",route="slow",le="0.5"}') == 0
assert value('spillway_upstream_duration_seconds_count{route="slow"}') == 0, "no upstream answer on slow"
assert (value('spillway_upstream_duration_seconds_count{route="app"}') or 0) >= 2, "the app's answers"
assert value(f'spillway_config_info{{version="{version}"}}') == 1, f"config_info does not name {version}"
print(f"families: all {len(declared) - 1} exposed (TLS: no TLS listener); the 504 on le=\"1\"; config_info names {version}")
EOF
