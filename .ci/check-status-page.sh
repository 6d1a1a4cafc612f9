#!/usr/bin/env bash
# The admin status page as a person sees it: starts `spillway demo` (ports rewritten to free
# loopback ports), sends traffic through every demo route, loads http://<admin>/ in headless
# Chromium while traffic keeps flowing, and checks that
#   - the screenshot is a real 1280x800 PNG with content (not a blank or error page), and
#   - the DOM after the page's script ran holds one script-rendered row per route, the
#     readiness badge and the reload result.
# Installs chromium (Debian package) when it is missing. Set SPILLWAY_BIN to test a binary
# that is already built; STATUS_PNG to keep the screenshot somewhere (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
# shellcheck source=SCRIPTDIR/../scripts/lib.sh
source scripts/lib.sh
need_tool chromium

bin=${SPILLWAY_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release -q --bin spillway
  bin=target/release/spillway
fi
work=$(mktemp -d)
traffic=
cleanup() {
  if [ -n "$traffic" ]; then kill "$traffic" 2>/dev/null || true; fi
  stop_demo TERM || true
  rm -rf "$work"
}
trap cleanup EXIT

start_demo "$bin" "$work"

# A bounded mix of answers from every layer: app 2xx/4xx/5xx, proxy 502 (/broken), proxy 504
# (/slow beyond the route timeout), unmatched methods. Runs on while the page samples.
send_mix() {
  local rounds=$1
  for _ in $(seq 1 "$rounds"); do
    for path in /ok /ok /ok /ok /ok /ok /status/404 /status/500 '/flaky?p=0.3' /broken '/slow?ms=20'; do
      curl -s -o /dev/null --max-time 3 "http://127.0.0.1:$proxy$path" || true
    done
  done
}
send_mix 5
curl -s -o /dev/null --max-time 3 "http://127.0.0.1:$proxy/slow?ms=1500" || true
( send_mix 60 ) >/dev/null 2>&1 &
traffic=$!

chrome() {
  timeout 90 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$(mktemp -d -p "$work")" --window-size=1280,800 \
    --virtual-time-budget=5000 "$@" "http://127.0.0.1:$admin/" 2>>"$work/chromium.log"
}

png=${STATUS_PNG:-$work/status.png}
chrome --screenshot="$png" >/dev/null
chrome --dump-dom > "$work/dom.html"
kill "$traffic" 2>/dev/null || true; wait "$traffic" 2>/dev/null || true; traffic=

fail() { echo "status page check failed: $*"; exit 1; }

# The PNG: signature, IHDR size, and enough bytes that it is not a flat blank page.
python3 - "$png" <<'EOF' || fail "screenshot is not a usable PNG (see above)"
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
w, h = struct.unpack(">II", data[16:24])
assert (w, h) == (1280, 800), f"size {w}x{h}"
assert len(data) > 20_000, f"only {len(data)} bytes: blank page?"
print(f"screenshot: {w}x{h}, {len(data)} bytes")
EOF

# The DOM after the script ran: one row per demo route, rendered by the script (the
# server-rendered rows lack the share line), readiness and reload badges filled in.
for route in slow broken app; do
  grep -q "data-route=\"$route\"" "$work/dom.html" || fail "no row for route $route"
done
rows=$(grep -o 'class="route"' "$work/dom.html" | wc -l)
[ "$rows" -ge 3 ] || fail "expected at least 3 route rows, found $rows"
grep -q '5xx proxy' "$work/dom.html" || fail "rows were not rendered by the page script"
grep -q 'id="ready" class="badge ok">ready<' "$work/dom.html" || fail "readiness badge missing"
grep -q 'id="reload" class="badge ok">ok<' "$work/dom.html" || fail "reload badge missing"
grep -q 'connection refused' "$work/dom.html" && fail "the page shows a connection error"

# The JSON the page polls agrees: every route present, the 502s counted as the proxy's.
curl -fsS "http://127.0.0.1:$admin/status.json" > "$work/status.json"
python3 - "$work/status.json" <<'EOF' || fail "status.json does not hold the expected counts"
import json, sys
s = json.load(open(sys.argv[1]))
rows = {r["name"]: r for r in s["routes"]}
assert {"slow", "broken", "app"} <= rows.keys(), rows.keys()
assert rows["broken"]["requests"]["proxy"]["5xx"] > 0, rows["broken"]
assert rows["app"]["requests"]["upstream"]["2xx"] > 0, rows["app"]
assert rows["app"]["requests"]["upstream"]["5xx"] > 0, rows["app"]
print("status.json: " + ", ".join(f'{n}={r["requests"]["total"]}' for n, r in rows.items()))
EOF
echo "status page: $rows route rows rendered, screenshot ok ($((SECONDS - started)) s)"
