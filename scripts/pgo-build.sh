#!/usr/bin/env bash
# scripts/pgo-build.sh — the release build we ship: profile-guided (PGO) and fat-LTO.
#
#   bash scripts/pgo-build.sh           # -> target/pgo/spillway (about 7 minutes on 2 cores)
#
# 1. builds an instrumented binary (cargo profile `dist`: release with fat LTO);
# 2. trains it: `spillway demo` (its built-in sample app as the upstream) with a training
#    config (plain and TLS listeners), loaded by wrk with a mix of requests: small and streamed
#    responses, errors the app returns, 502s and 503s spillway generates, request bodies,
#    and some of them through an HTTP/2 upstream (the same app, prior knowledge);
#    once with the access log on (the default) and once with it off;
# 3. merges the profile (llvm-profdata from rustup's llvm-tools) and builds again with it;
# 4. checks the result answers a request.
# What it gains over `cargo build --release` is measured in benches/RESULTS.md.
#
# Needs: cargo and rustup, wrk, curl, openssl (installed with apt-get when missing and run
# as root; scripts/lib.sh). Listens on free ports of 127.0.0.1 only (plain, TLS and admin,
# picked by lib.sh's start_demo); every step is bounded in time.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
source "$REPO/scripts/lib.sh"
TRAIN_SECONDS=${PGO_TRAIN_SECONDS:-5}
WORK=${PGO_WORK_DIR:-$REPO/target/pgo-work}
OUT=${PGO_OUT:-$REPO/target/pgo}
HOST=$(rustc -vV | sed -n 's/^host: //p')

say() { printf '[pgo %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
fail() { printf 'pgo-build: %s\n' "$*" >&2; exit 1; }

need_tools wrk curl openssl
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata
if [[ ! -x $PROFDATA ]]; then
    say "adding rustup's llvm-tools (llvm-profdata)"
    rustup component add llvm-tools >/dev/null 2>&1 || fail "rustup component add llvm-tools failed"
    [[ -x $PROFDATA ]] || fail "llvm-profdata not found at $PROFDATA"
fi
rm -rf "$WORK" && mkdir -p "$WORK/raw" "$OUT"
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros: only spillway's
# own binary is instrumented and optimized with the profile.
build() { # TARGET_DIR RUSTFLAGS
    (cd "$REPO" && RUSTFLAGS="$2" cargo build --locked --profile dist --bin spillway \
        --target "$HOST" --target-dir "$1")
}

say "1/4 instrumented build"
build "$REPO/target/pgo-gen" "-Cprofile-generate=$WORK/raw"
GEN=$REPO/target/pgo-gen/$HOST/dist/spillway

say "2/4 training"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=localhost" -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
# start_demo moves 127.0.0.1:8080, :8443 and :9901 to free ports ($proxy, $proxy_tls, $admin).
cat >"$WORK/train.yaml" <<EOF
server_id: pgo-train
listeners:
  - name: http
    address: 127.0.0.1:8080
  - name: https
    address: 127.0.0.1:8443
    tls: { cert_file: $WORK/cert.pem, key_file: $WORK/key.pem }
admin:
  address: 127.0.0.1:9901
upstreams:
  app:
    endpoints: ["\${SPILLWAY_DEMO_APP}"]
  # The same app over HTTP/2 (prior knowledge; the demo app speaks both), so the HTTP/2
  # upstream client is trained too.
  app-h2:
    endpoints: ["\${SPILLWAY_DEMO_APP}"]
    protocol: http2
  nowhere:
    endpoints: ["127.0.0.1:1"]
routes:
  - name: h2
    match: { path_prefix: /, host: h2.train }
    upstream: app-h2
  - name: slow
    match: { path_prefix: /slow }
    upstream: app
    timeout: 1s
    concurrency: { max: 4, queue: 0 }
  - name: broken
    match: { path_prefix: /broken }
    upstream: nowhere
  - name: app
    match: { path_prefix: / }
    upstream: app
    concurrency: { max: 100000 }
shutdown:
  drain_delay: 0s
  drain_timeout: 1s
EOF
# Mostly small successful GETs, as in real traffic, and every other kind of exchange too.
cat >"$WORK/mix.lua" <<'EOF'
local reqs = {}
local function add(n, method, path, body, host)
  local headers = { ["Content-Type"] = "text/plain", ["Host"] = host }
  for _ = 1, n do
    reqs[#reqs + 1] = wrk.format(method, path, headers, body)
  end
end
add(12, "GET", "/ok")
add(2, "GET", "/api/items?page=2")
add(2, "POST", "/ok", string.rep("x", 2048))
add(1, "GET", "/stream?chunks=16&interval_ms=0")
add(1, "GET", "/status/500")
add(1, "GET", "/status/404")
add(1, "GET", "/flaky?p=0.3")
add(1, "GET", "/slow?ms=2")
add(1, "GET", "/broken")
-- Through the HTTP/2 upstream.
add(2, "GET", "/ok", nil, "h2.train")
add(1, "POST", "/ok", string.rep("x", 2048), "h2.train")
add(1, "GET", "/stream?chunks=16&interval_ms=0", nil, "h2.train")
local i = 0
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
EOF

# The demo (lib.sh's start_demo) runs the training config, as this shell's own child (no
# `timeout` in between): stop_demo's SIGINT, a clean shutdown, then reaches the instrumented
# build once, and it writes the profile as it exits.
DEMO_CONFIG=$WORK/train.yaml
DEMO_TIMEOUT=0
trap 'stop_demo INT || true' EXIT
train() { # RUST_LOG value
    say "  training with RUST_LOG=$1"
    local slow=()
    DEMO_RUST_LOG=$1 start_demo "$GEN" "$WORK"
    # Alongside: route timeouts (504), HEAD (which wrk cannot parse), HTTP/2 over TLS.
    for _ in 1 2 3 4; do
        curl -so /dev/null --max-time 5 "http://127.0.0.1:$proxy/slow?ms=1500" &
        slow+=($!)
    done
    for _ in $(seq 20); do
        curl -fsIo /dev/null "http://127.0.0.1:$proxy/ok"
        curl -ksSo /dev/null --http2 "https://127.0.0.1:$proxy_tls/ok" || true
    done
    timeout $((TRAIN_SECONDS + 20)) wrk -t1 -c32 -d"${TRAIN_SECONDS}s" -s "$WORK/mix.lua" \
        "http://127.0.0.1:$proxy" >/dev/null
    timeout $((TRAIN_SECONDS + 20)) wrk -t1 -c16 -d"${TRAIN_SECONDS}s" -s "$WORK/mix.lua" \
        "https://127.0.0.1:$proxy_tls" >/dev/null
    curl -fso /dev/null "http://127.0.0.1:$admin/metrics"
    wait "${slow[@]}" || true
    stop_demo INT
}
train "info"
train "info,spillway::access=off"
compgen -G "$WORK/raw/*.profraw" >/dev/null || fail "training wrote no profile"

say "3/4 merging the profile and building with it"
"$PROFDATA" merge -o "$WORK/spillway.profdata" "$WORK/raw"
build "$REPO/target/pgo-use" "-Cprofile-use=$WORK/spillway.profdata"
install -m 0755 "$REPO/target/pgo-use/$HOST/dist/spillway" "$OUT/spillway"

say "4/4 checking the result"
mkdir -p "$WORK/check"
DEMO_RUST_LOG=info start_demo "$OUT/spillway" "$WORK/check"
curl -fso /dev/null "http://127.0.0.1:$proxy/ok" || fail "$OUT/spillway does not answer (see $demo_log)"
stop_demo INT
say "done: $OUT/spillway ($("$OUT/spillway" --version))"
