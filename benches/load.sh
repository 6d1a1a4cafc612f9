#!/usr/bin/env bash
# benches/load.sh — spillway's throughput, latency and memory next to nginx and HAProxy,
# measured with the reference harness (shared/bench, see its README.md).
#
#   bash benches/load.sh                          # ~2 min 30 s with the defaults (+ build)
#   DURATION=3 WARMUP=1 bash benches/load.sh      # quick smoke run
#   REPEAT=3 bash benches/load.sh                 # for decisions: medians over 3 rounds
#
# 1. `cargo build --release` (skipped when SPILLWAY_BIN is set).
# 2. The harness's run.sh with its spillway slot pointed at benches/spillway-load.yaml
#    (started as `spillway run --config <rendered copy>`): closed-loop wrk, cases small /
#    big / conns, TARGETS (default: direct nginx haproxy spillway). Every harness knob
#    (DURATION WARMUP REPEAT CASES LOAD_CPU PROXY_CPU BIG_BYTES CONNS_HIGH ...) passes through.
# 3. The harness's summarize.sh over the raw results.
# 4. Our own additions, which the harness does not measure (skip with EXTRAS=0):
#    - idle RSS: spillway started with the same config, once GET /health through it answers
#      200 and it has sat idle for IDLE_SETTLE seconds;
#    - added latency: benches/latency_probe.rs, a paired open-loop probe: LAT_RPS (default
#      5000) ticks per second, each sending one request straight to the upstream and one
#      through the proxy, LAT_DURATION s after LAT_WARMUP s, LAT_ROUNDS rounds of spillway
#      then nginx; reported as the proxy's p50/p99 minus direct's in the same run (and the p99
#      of the per-tick differences), medians over the rounds.
#
# Output: tables on stdout; everything under RESULTS_DIR
# (default /tmp/bench-results/spillway-load-<date>): the harness's raw.tsv and wrk outputs,
# extras/ (the probe's output, logs) and report.txt (summary + extras).
# All traffic stays on 127.0.0.1; every load step is bounded (wrk -d, the probe's --duration, timeout, and
# a watchdog over the extras).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

export TARGETS=${TARGETS:-direct nginx haproxy spillway}
export RESULTS_DIR=${RESULTS_DIR:-/tmp/bench-results/spillway-load-$(date +%Y%m%d-%H%M%S)}
SPILLWAY_CONFIG=${SPILLWAY_CONFIG:-$BENCHES_DIR/spillway-load.yaml}
export SPILLWAY_CONFIG
EXTRAS=${EXTRAS:-1}
LAT_DURATION=${LAT_DURATION:-10}       # seconds of measured load per latency sample
LAT_WARMUP=${LAT_WARMUP:-2}            # seconds of discarded load before each sample
LAT_ROUNDS=${LAT_ROUNDS:-1}            # rounds of (direct + spillway), (direct + nginx)
LAT_CONNS=${LAT_CONNS:-64}             # as the harness's `small` case
LAT_RPS=${LAT_RPS:-5000}               # pairs per second (see step 4 for why not half load)
IDLE_SETTLE=${IDLE_SETTLE:-2}
EXTRA_UP_PORT=${EXTRA_UP_PORT:-18180}  # ports for step 4 (the harness uses 18080-18089)
EXTRA_PORT=${EXTRA_PORT:-18184}
EXTRA_NGINX_PORT=${EXTRA_NGINX_PORT:-18185}
LAT_NGINX=${LAT_NGINX:-1}

build_spillway
[[ -f "$SPILLWAY_CONFIG" ]] || fail "SPILLWAY_CONFIG=$SPILLWAY_CONFIG is not a file"
mkdir -p "$RESULTS_DIR"
say "harness: $HARNESS ; upstream: $UPSTREAM_BIN ; spillway: $SPILLWAY_BIN $SPILLWAY_ARGS ; config: $SPILLWAY_CONFIG"

# ---- 2. the harness ----------------------------------------------------------------------
harness_rc=0
bash "$HARNESS/run.sh" || harness_rc=$?
(( harness_rc == 0 )) || say "harness run.sh exited with $harness_rc"
RAW=$RESULTS_DIR/raw.tsv
[[ -s "$RAW" ]] || fail "no results in $RAW (see the log above)"
if ! awk -F'\t' 'NR > 1 && $3 == "spillway" { found = 1 } END { exit !found }' "$RAW"; then
    say "WARNING: no spillway rows in $RAW: it did not start? see $RESULTS_DIR/spillway/stderr.log"
fi

# ---- 3. summary ------------------------------------------------------------------------------
REPORT=$RESULTS_DIR/report.txt
{
    echo "== closed loop (harness run.sh; summarize.sh $RAW) =="
    bash "$HARNESS/summarize.sh" "$RAW"
} >"$REPORT"

# ---- 4. extras -------------------------------------------------------------------------------
if (( EXTRAS )); then
    # The harness helpers: start_bg (pinned, tracked), stop_pid, wait_http,
    # descendants, median_of, watchdog, cleanup. Sourcing only defines things.
    source "$HARNESS/lib.sh"
    require_tool jq "apt-get install -y jq"
    say "building the latency probe (benches/latency_probe.rs)"
    PROBE_BIN=$(cd "$REPO_DIR" && cargo build --release --bench latency_probe --message-format=json-render-diagnostics \
        | jq -r 'select(.reason == "compiler-artifact" and .target.name == "latency_probe") | .executable') \
        || fail "could not build the latency probe: (cd $REPO_DIR && cargo build --release --bench latency_probe)"
    [[ -x "$PROBE_BIN" ]] || fail "built, but the latency probe ('$PROBE_BIN') is missing"
    require_tool curl "apt-get install -y curl"
    check_ports_free "$EXTRA_UP_PORT" "$EXTRA_PORT"
    command -v nginx >/dev/null || LAT_NGINX=0
    (( LAT_NGINX )) && check_ports_free "$EXTRA_NGINX_PORT"
    X=$RESULTS_DIR/extras; mkdir -p "$X"
    budget=$(( 100 + IDLE_SETTLE + LAT_ROUNDS * 2 * (LAT_WARMUP + LAT_DURATION + 45) ))
    guard_run "$budget"

    render_config "$SPILLWAY_CONFIG" "$X/spillway.yaml" PORT="$EXTRA_PORT" UPSTREAM="127.0.0.1:$EXTRA_UP_PORT" \
        UPSTREAM_MAXCONN=0 QUEUE_TIMEOUT=30s
    start_bg upstream "$LOAD_CPU" "$X/upstream.log" "$UPSTREAM_BIN" --listen "127.0.0.1:$EXTRA_UP_PORT" --threads 1
    UPID=$LAST_PID
    wait_http "http://127.0.0.1:$EXTRA_UP_PORT/health" 10 "$UPID" || fail "upstream did not start (see $X/upstream.log)"
    read -r -a sargs <<<"${SPILLWAY_ARGS//"{config}"/$X/spillway.yaml}"
    start_bg spillway "$PROXY_CPU" "$X/spillway.log" "$SPILLWAY_BIN" "${sargs[@]}"
    SPID=$LAST_PID
    t_start=$(date +%s%N)
    wait_http "http://127.0.0.1:$EXTRA_PORT/health" 15 "$SPID" \
        || { tail -5 "$X/spillway.log" >&2; fail "spillway did not answer GET /health with 200 within 15 s (see $X/spillway.log)"; }
    ready_ms=$(( ($(date +%s%N) - t_start) / 1000000 ))
    sleep "$IDLE_SETTLE"
    mapfile -t spids < <(descendants "$SPID")
    status_kib() { local p s=0 v; for p in "${spids[@]}"; do v=$(awk -v k="$1:" '$1 == k { print $2 }' "/proc/$p/status" 2>/dev/null); s=$(( s + ${v:-0} )); done; echo "$s"; }
    idle_rss=$(status_kib VmRSS)
    threads=$(status_kib Threads)
    say "spillway idle: ready in ${ready_ms} ms, RSS $(( idle_rss / 1024 )) MiB, $threads threads"
    lat_targets="direct spillway"
    if (( LAT_NGINX )); then
        raise_nofile
        mkdir -p "$X/nginx"
        render_template "$CONF_DIR/nginx.conf.tmpl" "$X/nginx/nginx.conf" WORKERS=1 NOFILE="$NOFILE" \
            RUNDIR="$X/nginx" UPSTREAM="127.0.0.1:$EXTRA_UP_PORT" SERVER_OPTS="" PORT="$EXTRA_NGINX_PORT"
        start_bg nginx "$PROXY_CPU" "$X/nginx/stderr.log" nginx -p "$X/nginx" -c "$X/nginx/nginx.conf" -e "$X/nginx/nginx-error.log"
        NPID=$LAST_PID
        if wait_http "http://127.0.0.1:$EXTRA_NGINX_PORT/health" 15 "$NPID"; then
            lat_targets="direct nginx spillway"
        else
            say "nginx did not start for the latency reference (see $X/nginx/); measuring without it"
        fi
    fi

    # Added latency: the paired open-loop probe (benches/latency_probe.rs), LAT_ROUNDS rounds
    # of (direct + spillway), then (direct + nginx). Each tick sends one request straight to
    # the upstream and one through the proxy at the same moment, so both live through the same
    # noise; sequential samples (oha against each target in turn, as this script did before)
    # moved the upstream's own p99 by milliseconds from one sample to the next. The probe and
    # the upstream share LOAD_CPU, so a pair costs that core two requests: at LAT_RPS (default
    # 5000 pairs/s) the upstream serves 10,000 req/s; at 12,000 pairs/s the core saturated
    # (the direct p50 rose to 0.4 s), so the proxy's true half load (~16,000 req/s) cannot be
    # measured paired on 2 cores.
    printf 'round\ttarget\tp50\tp99\tp999\tdirect_p50\tdirect_p99\tdirect_p999\ttick_p50\ttick_p99\tunanswered\tdirect_unanswered\n' >"$X/latency.tsv"
    pair_sample() { # ROUND NAME PORT -> appends one row to $X/latency.tsv
        local r=$1 name=$2 port=$3 out="$X/probe-r$1-$2.txt"
        timeout $(( LAT_WARMUP + LAT_DURATION + 30 )) taskset -c "$LOAD_CPU" "$PROBE_BIN" --rate "$LAT_RPS" \
            --duration "$LAT_DURATION" --warmup "$LAT_WARMUP" --conns "$LAT_CONNS" \
            --target "direct=127.0.0.1:$EXTRA_UP_PORT" --target "$name=127.0.0.1:$port" >"$out" 2>&1 \
            || say "the probe failed/timed out for $name (see $out)"
        awk -F'\t' -v OFS='\t' -v r="$r" '$1 == "RESULT" { $1 = r; print }' "$out" >>"$X/latency.tsv"
        say "r$r $name @ $LAT_RPS/s paired with direct: $(awk -F'\t' '$1 == "RESULT" { printf "p50 %s ms (direct %s), p99 %s ms (direct %s), per-tick difference p50 %s p99 %s ms, unanswered %s/%s", $3, $6, $4, $7, $9, $10, $11, $12 }' "$out")"
    }
    for (( r = 1; r <= LAT_ROUNDS; r++ )); do
        pair_sample "$r" spillway "$EXTRA_PORT"
        [[ $lat_targets == *nginx* ]] && pair_sample "$r" nginx "$EXTRA_NGINX_PORT"
    done
    loaded_hwm=$(status_kib VmHWM)
    stop_pid "$SPID"; stop_pid "$UPID"
    [[ -n "${NPID:-}" ]] && stop_pid "$NPID"

    med() { awk -F'\t' -v t="$1" -v c="$2" 'NR > 1 && $2 == t && $c != "nan" { print $c }' "$X/latency.tsv" | median_of; }
    # Per round, the target's percentile minus direct's in the same run; median over rounds.
    med_added() { awk -F'\t' -v t="$1" -v c="$2" -v d="$3" 'NR > 1 && $2 == t && $c != "nan" && $d != "nan" { printf "%.3f\n", $c - $d }' "$X/latency.tsv" | median_of; }
    {
        echo
        echo "== spillway extras (benches/load.sh; raw: $X) =="
        printf 'idle RSS:              %.1f MiB (VmRSS, %s s after GET /health through it answered 200; ready in %s ms; %s threads)\n' \
            "$(awk -v k="$idle_rss" 'BEGIN { print k / 1024 }')" "$IDLE_SETTLE" "$ready_ms" "$threads"
        printf 'peak RSS after load:   %.1f MiB (VmHWM)\n' "$(awk -v k="$loaded_hwm" 'BEGIN { print k / 1024 }')"
        echo "added latency:         paired open loop, $LAT_RPS req/s to the upstream and $LAT_RPS req/s through the proxy at the same ticks,"
        echo "                       $LAT_CONNS connections each, ${LAT_DURATION}s after ${LAT_WARMUP}s warm-up; medians over $LAT_ROUNDS round(s)"
        fmt='  %-9s %9s %9s %9s %10s %10s %11s %11s %10s\n'
        printf "$fmt" target "p50 ms" "p99 ms" "p99.9 ms" "direct p99" "+p50 ms" "+p99 ms" "tick p99" unanswered
        for t in $lat_targets; do
            [[ $t == direct ]] && continue
            printf "$fmt" "$t" "$(med "$t" 3)" "$(med "$t" 4)" "$(med "$t" 5)" "$(med "$t" 7)" \
                "$(med_added "$t" 3 6)" "$(med_added "$t" 4 7)" "$(med "$t" 10)" "$(med "$t" 11)"
        done
        echo "  +p50/+p99: the proxy's percentile minus direct's in the same paired run; tick p99: p99 of the"
        echo "  per-tick differences (proxied minus direct latency of the requests sent together)"
    } >>"$REPORT"
    stop_watchdog
fi

echo
cat "$REPORT"
say "raw results: $RESULTS_DIR (raw.tsv, wrk-*.txt, */stderr.log$( (( EXTRAS )) && echo ', extras/'))"
exit "$harness_rc"
