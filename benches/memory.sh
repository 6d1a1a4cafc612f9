#!/usr/bin/env bash
# benches/memory.sh — what a proxy holds per connection: resident memory (RSS) with 1k, 5k and
# ~10k idle keep-alive connections (each has made one request), and the peak RSS while 1k and
# 5k connections are busy (wrk, small responses), for spillway, nginx and HAProxy in the same
# run (one worker / nbthread 1 / one CPU each, pinned to PROXY_CPU).
#
#   bash benches/memory.sh                         # builds spillway (release)
#   SPILLWAY_BIN=target/pgo/spillway bash benches/memory.sh
#   IDLE_LEVELS="1000 5000" BUSY_LEVELS=1000 TARGETS="spillway haproxy" bash benches/memory.sh
#
# The sandbox caps open files at 20000 (hard limit), and a proxy may need two descriptors per
# connection, so the top idle level defaults to 9500 rather than 10000; raise IDLE_LEVELS
# where the limit allows. Prints a table (MiB) and writes it to RESULTS_DIR/memory.tsv.
# Loopback only; every step is bounded in time.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$HARNESS/lib.sh"

IDLE_LEVELS=${IDLE_LEVELS:-1000 5000 9500}
BUSY_LEVELS=${BUSY_LEVELS:-1000 5000}
BUSY_SECONDS=${BUSY_SECONDS:-5}
TARGETS=${TARGETS:-spillway nginx haproxy}
OUT=${RESULTS_DIR:-/tmp/bench-results/memory-$(date +%Y%m%d-%H%M%S)}
require_tool wrk "apt-get install -y wrk"
require_tool python3 "apt-get install -y python3"
build_spillway
export SPILLWAY_CONFIG=$BENCHES_DIR/spillway-memory.yaml
for t in $TARGETS; do target_available "$t" || fail "$t is not installed (apt-get install -y nginx haproxy)"; done
mkdir -p "$OUT"
raise_nofile 20000
guard_run 1800
check_ports_free "$UP_PORT" "${PORT_OF[nginx]}" "${PORT_OF[haproxy]}" "${PORT_OF[spillway]}"

start_bg upstream "$LOAD_CPU" "$OUT/upstream.log" "$UPSTREAM_BIN" --listen "127.0.0.1:$UP_PORT" --threads 1
wait_http "http://127.0.0.1:$UP_PORT/health" 10 "$LAST_PID" || fail "upstream did not start"

rss_kib() { # sum of VmRSS over the proxy's processes
    local p total=0 v
    for p in $(descendants "$1"); do
        v=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)
        total=$(( total + ${v:-0} ))
    done
    echo "$total"
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# hold PORT N: a holder process with N more idle connections; waits until they answered.
declare -a HOLDERS=()
hold() {
    local ready="$OUT/ready.$RANDOM" i
    rm -f "$ready"
    taskset -c "$LOAD_CPU" python3 "$BENCHES_DIR/hold_conns.py" "$1" "$2" "$ready" >"$OUT/holder.log" 2>&1 &
    HOLDERS+=("$!")
    for i in $(seq 1 600); do [[ -s "$ready" ]] && break; sleep 0.1; done
    [[ -s "$ready" ]] || fail "holder did not finish opening $2 connections"
    grep -q '^ready' "$ready" || say "holder: $(cat "$ready")"
}
release() { local p; for p in "${HOLDERS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; HOLDERS=(); }

header="target	idle0"
for n in $IDLE_LEVELS; do header+="	idle${n}"; done
for n in $BUSY_LEVELS; do header+="	busy${n}_peak"; done
echo "$header" >"$OUT/memory.tsv"

for t in $TARGETS; do
    say "== $t"
    start_proxy "$t" "$OUT" "" 30s || fail "$t did not start"
    pid=$PROXY_PID port=$PROXY_PORT
    sleep 1
    row="$t	$(mib "$(rss_kib "$pid")")"
    held=0
    for n in $IDLE_LEVELS; do
        hold "$port" $(( n - held ))
        held=$n
        sleep 2
        row+="	$(mib "$(rss_kib "$pid")")"
        say "$t: $n idle connections: $(mib "$(rss_kib "$pid")") MiB"
    done
    release
    sleep 2
    for n in $BUSY_LEVELS; do
        reset_hwm $(descendants "$pid")
        timeout $(( BUSY_SECONDS + 30 )) taskset -c "$LOAD_CPU" wrk -t1 -c"$n" -d"${BUSY_SECONDS}s" \
            "http://127.0.0.1:$port/" >"$OUT/wrk-$t-$n.txt" 2>&1 || true
        peak=$(hwm_kib $(descendants "$pid"))
        row+="	$(mib "$peak")"
        say "$t: $n busy connections: peak $(mib "$peak") MiB ($(awk '/Requests\/sec/ { print $2 }' "$OUT/wrk-$t-$n.txt") req/s)"
        sleep 2
    done
    echo "$row" >>"$OUT/memory.tsv"
    stop_pid "$pid"
done

echo
column -t -s $'\t' "$OUT/memory.tsv" | tee "$OUT/report.txt"
echo "(MiB; idleN: RSS with N idle keep-alive connections; busyN_peak: peak RSS under wrk -c N)"
