#!/usr/bin/env bash
# benches/callgrind.sh — instructions per proxied request, counted by valgrind's callgrind:
# a deterministic figure for hot-path work, where wall-clock A/B runs on a shared machine
# are too noisy to see a few percent.
#
#   bash benches/callgrind.sh                                   # target/release/spillway
#   SPILLWAY_BIN=/path/to/spillway bash benches/callgrind.sh
#   RUST_LOG=info bash benches/callgrind.sh                     # with the access log on
#
# spillway runs under callgrind pinned to PROXY_CPU (one CPU: its single-threaded scheduler)
# with benches/spillway-load.yaml; wrk (-t1 -c CONNS, DURATION s, GET / with a 64-byte body)
# and the harness's upstream share LOAD_CPU. The count covers every thread of spillway from
# start to stop; STARTUP_INSTR (measured with no requests: ~2.3 million) is taken off before
# dividing by the requests wrk completed. Prints the figure; the callgrind output stays in
# RESULTS_DIR for callgrind_annotate. Loopback only; every step is bounded.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$HARNESS/lib.sh"

DURATION=${DURATION:-6}
CONNS=${CONNS:-16}
LOAD_CPU=${LOAD_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
STARTUP_INSTR=${STARTUP_INSTR:-2300000}
UP_PORT=${CG_UP_PORT:-18195}
SP_PORT=${CG_SPILLWAY_PORT:-18196}
ADMIN_PORT=${CG_ADMIN_PORT:-19916}
OUT=${RESULTS_DIR:-/tmp/bench-results/spillway-callgrind-$(date +%Y%m%d-%H%M%S)}
require_tool valgrind "apt-get install -y valgrind"
require_tool callgrind_annotate "apt-get install -y valgrind"
require_tool wrk "apt-get install -y wrk"
build_spillway
check_ports_free "$UP_PORT" "$SP_PORT" "$ADMIN_PORT"
mkdir -p "$OUT"
guard_run $(( DURATION + 120 ))

render_load_config "$OUT/spillway.yaml" "$SP_PORT" "127.0.0.1:$UP_PORT" "$ADMIN_PORT"
start_bg upstream "$LOAD_CPU" "$OUT/upstream.log" "$UPSTREAM_BIN" --listen "127.0.0.1:$UP_PORT" --threads 1
wait_http "http://127.0.0.1:$UP_PORT/health" 10 "$LAST_PID" || fail "upstream did not start"
start_bg spillway "$PROXY_CPU" "$OUT/spillway.log" valgrind --tool=callgrind \
    --callgrind-out-file="$OUT/callgrind.out" "$SPILLWAY_BIN" run --config "$OUT/spillway.yaml"
SPID=$LAST_PID
# Under valgrind startup takes seconds; /health through spillway also warms the pool.
wait_http "http://127.0.0.1:$SP_PORT/health" 60 "$SPID" || fail "spillway did not start under valgrind (see $OUT/spillway.log)"
requests=$(timeout $(( DURATION + 30 )) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" \
    "http://127.0.0.1:$SP_PORT/" | awk '/requests in/ { print $1 }')
# SIGINT: spillway shuts down cleanly and callgrind writes its output.
kill -INT "$SPID"
for _ in $(seq 100); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
total=$(callgrind_annotate "$OUT/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
[[ -n "$total" && -n "$requests" && "$requests" -gt 0 ]] || fail "no count (requests='$requests', total='$total'; see $OUT)"
printf 'requests %s, instructions %s, per request %d (RUST_LOG=%s)\n' \
    "$requests" "$total" $(( (total - STARTUP_INSTR) / requests )) "$RUST_LOG" | tee "$OUT/report.txt"
cleanup_all
stop_watchdog
