#!/usr/bin/env bash
# The admin status page as a person sees it: starts `spillway demo` (ports rewritten to free
# loopback ports), sends traffic through every demo route, loads http://<admin>/ in headless
# Chromium in a 1024x800 window (.ci/page-snapshot.py drives it over the DevTools pipe) while
# traffic keeps flowing, and checks that
#   - the screenshot is a real 1024x800 PNG with content (not a blank or error page);
#   - the page fits the window: nothing scrolls sideways, the table ends inside it, and no
#     table cell's content is wider than its cell;
#   - the DOM after the page's script ran holds one script-rendered row per route, the
#     readiness badge and the reload result, spillway's sheds and failures in columns of their
#     own, and counts since start labelled as such;
#   - after a refused reload, the page says so and lists the error lines.
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

fail() { echo "status page check failed: $*"; exit 1; }

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

snapshot() { # NAME: writes $work/NAME.png, .html (the DOM) and .json (layout facts)
  timeout 120 python3 .ci/page-snapshot.py "$(command -v chromium)" "http://127.0.0.1:$admin/" \
    1024 800 3 "$work/$1" 2>>"$work/chromium.log" || { cat "$work/chromium.log"; fail "chromium could not load the page ($1)"; }
}

snapshot healthy
png=${STATUS_PNG:-$work/status.png}
cp "$work/healthy.png" "$png"

# The PNG: signature, IHDR size, and enough bytes that it is not a flat blank page.
python3 - "$png" <<'EOF' || fail "screenshot is not a usable PNG (see above)"
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
w, h = struct.unpack(">II", data[16:24])
assert (w, h) == (1024, 800), f"size {w}x{h}"
assert len(data) > 20_000, f"only {len(data)} bytes: blank page?"
print(f"screenshot: {w}x{h}, {len(data)} bytes")
EOF

# The layout in a 1024 px window: no sideways scrolling, the table inside the window, and no
# cell whose content is wider than the cell.
python3 - "$work/healthy.json" <<'EOF' || fail "the page does not fit a 1024 px window (see above)"
import json, sys
f = json.load(open(sys.argv[1]))
assert f["viewport"] == 1024, f
assert f["scroll_width"] <= f["viewport"], f"scrolls sideways: {f}"
assert f["table_right"] is not None and f["table_right"] <= f["viewport"], f"table wider than the window: {f}"
assert not f["spilled"], f"cells whose content is wider than the cell: {f['spilled']}"
print(f"layout: fits {f['viewport']} px (document {f['scroll_width']} px, table ends at {f['table_right']:.0f} px)")
EOF

dom=$work/healthy.html
# The DOM after the script ran: one row per demo route, rendered by the script (the
# server-rendered rows lack the share line), readiness and reload badges filled in.
for route in slow broken app; do
  grep -q "data-route=\"$route\"" "$dom" || fail "no row for route $route"
done
rows=$(grep -o 'class="route"' "$dom" | wc -l)
[ "$rows" -ge 3 ] || fail "expected at least 3 route rows, found $rows"
grep -q 'class="shares"' "$dom" || fail "rows were not rendered by the page script"
grep -q 'id="ready" class="badge ok">ready<' "$dom" || fail "readiness badge missing"
grep -q 'id="reload" class="badge ok">ok<' "$dom" || fail "reload badge missing"
if grep -q 'connection refused' "$dom" && ! grep -q 'data-route="broken"' "$dom"; then
  fail "the page shows a connection error"
fi
grep -q 'Shed 503</th>' "$dom" || fail "no column for spillway's sheds"
grep -q 'Failed 502/504</th>' "$dom" || fail "no column for spillway's failures"
grep -q ' since start</div>' "$dom" || fail "counts since start are not labelled as such"
# The broken route's 502s are in the failed column (the fifth cell), in its colour, since start.
python3 - "$dom" <<'EOF' || fail "the broken route's 502s are not in the failed column"
import re, sys
html = open(sys.argv[1]).read()
row = re.search(r'<tr class="route" data-route="broken">(.*?)</tr>', html, re.S).group(1)
cells = re.findall(r"<td.*?</td>", row, re.S)
failed, shed = cells[4], cells[3]
assert 'class="fail-n"' in failed, failed
assert re.search(r"[1-9][0-9]* since start", failed), failed
assert ">0 since start<" in shed, shed
print("failed column of route broken: " + " ".join(re.sub(r"<[^>]+>", " ", failed).split()))
EOF
kill "$traffic" 2>/dev/null || true; wait "$traffic" 2>/dev/null || true; traffic=

# The JSON the page polls agrees: every route present, the 502s counted as the proxy's.
curl -fsS "http://127.0.0.1:$admin/status.json" > "$work/status.json"
python3 - "$work/status.json" <<'EOF' || fail "status.json does not hold the expected counts"
import json, sys
s = json.load(open(sys.argv[1]))
rows = {r["name"]: r for r in s["routes"]}
assert {"slow", "broken", "app"} <= rows.keys(), rows.keys()
assert rows["broken"]["requests"]["proxy"]["5xx"] > 0, rows["broken"]
assert rows["broken"]["requests"]["failed"] == rows["broken"]["requests"]["proxy"]["5xx"], rows["broken"]
assert rows["app"]["requests"]["upstream"]["2xx"] > 0, rows["app"]
assert rows["app"]["requests"]["upstream"]["5xx"] > 0, rows["app"]
assert rows["app"]["latency_2xx"]["count"] > 0 and rows["app"]["upstream_latency"]["count"] > 0, rows["app"]
print("status.json: " + ", ".join(f'{n}={r["requests"]["total"]}' for n, r in rows.items()))
EOF

# A refused reload: the page says so and shows why, line by line.
echo "routes: [{ name: extra, upstream: nowhere }]" >> "$demo_config"
code=$(curl -s -o "$work/reload.json" -w '%{http_code}' -X POST "http://127.0.0.1:$admin/reload")
[ "$code" = 422 ] || fail "the broken config was not refused (HTTP $code)"
snapshot refused
grep -q 'id="reload" class="badge bad">FAILED<' "$work/refused.html" || fail "no FAILED reload badge"
python3 - "$work/refused.html" "$work/reload.json" <<'EOF' || fail "the refused reload's error lines are not on the page"
import html as h, json, re, sys
page = open(sys.argv[1]).read()
banner = re.search(r'<div id="banner"[^>]*>(.*?)</div>', page, re.S).group(1)
lines = [h.unescape(l) for l in re.findall(r"<li>(.*?)</li>", banner, re.S)]
errors = json.load(open(sys.argv[2]))["errors"]
assert len(lines) == len(errors) > 0, (lines, errors)
for line, e in zip(lines, errors):
    assert line.startswith(f"{e['path']}: {e['message']}") if e["path"] else line.startswith(e["message"]), (line, e)
print(f"refused reload: the banner lists its {len(lines)} error line(s), e.g. {lines[0]!r}")
EOF
python3 - "$work/refused.json" <<'EOF' || fail "the page with the reload banner does not fit 1024 px"
import json, sys
f = json.load(open(sys.argv[1]))
assert f["scroll_width"] <= f["viewport"] and not f["spilled"], f
EOF
echo "status page: $rows route rows rendered, fits 1024 px, screenshot ok ($((SECONDS - started)) s)"
