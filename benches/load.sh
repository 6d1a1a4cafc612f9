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
#    - added latency at half load: oha open loop (-q R, --latency-correction, -c LAT_CONNS)
#      for LAT_DURATION s against the upstream directly and through spillway, LAT_ROUNDS
#      times in turn; reported as p99(spillway) - p99(direct) (and p50), medians over the
#      rounds. R = half of the lower of oha's closed-loop rates direct / through spillway
#      (LAT_CAL s each): oha is much slower than wrk, so half of wrk's rate would overrun
#      the client and measure its backlog, not latency. HALF_RPS overrides R.
#
# Output: tables on stdout; everything under RESULTS_DIR
# (default /tmp/bench-results/spillway-load-<date>): the harness's raw.tsv and wrk outputs,
# extras/ (oha JSON, logs) and report.txt (summary + extras).
# All traffic stays on 127.0.0.1; every load step is bounded (wrk -d, oha -z, timeout, and
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
LAT_ROUNDS=${LAT_ROUNDS:-1}            # direct, spillway, direct, spillway, ...
LAT_CONNS=${LAT_CONNS:-64}             # as the harness's `small` case
LAT_CAL=${LAT_CAL:-5}                  # seconds of the oha closed-loop calibration
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
    # The harness helpers: start_bg (pinned, tracked), stop_pid, wait_http, find_oha,
    # descendants, median_of, watchdog, cleanup. Sourcing only defines things.
    source "$HARNESS/lib.sh"
    OHA_BIN=$(find_oha) || fail "oha not found (looked at \$OHA, PATH, ~/.cargo/bin, /tmp/oha-root/bin). Install it with: cargo install oha --locked --root /tmp/oha-root"
    require_tool jq "apt-get install -y jq"
    require_tool curl "apt-get install -y curl"
    check_ports_free "$EXTRA_UP_PORT" "$EXTRA_PORT"
    command -v nginx >/dev/null || LAT_NGINX=0
    (( LAT_NGINX )) && check_ports_free "$EXTRA_NGINX_PORT"
    X=$RESULTS_DIR/extras; mkdir -p "$X"
    budget=$(( 100 + IDLE_SETTLE + 2 * LAT_CAL + LAT_ROUNDS * 3 * (LAT_WARMUP + LAT_DURATION + 45) ))
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

    # Rate. Capacity must be measured with the same client that measures the latency: oha
    # (one worker thread, sharing LOAD_CPU with the upstream) tops out far below wrk, and
    # through any proxy lower still (here: ~28k req/s direct, ~11k through HAProxy, vs wrk's
    # ~80k direct), and asking it for more than the path can carry makes
    # --latency-correction report a backlog, not a latency. So: oha closed loop (-c
    # LAT_CONNS, LAT_CAL s) straight to the upstream and through spillway, and half of the
    # lower of the two: both paths then run at most half loaded. HALF_RPS overrides.
    # wrk's direct `small` rate from step 2 is shown for reference.
    wrk_direct=$(awk -F'\t' 'NR > 1 && $2 == "small" && $3 == "direct" { print $4 }' "$RAW" | median_of)
    oha_closed() { # NAME URL -> req/s
        timeout $(( LAT_CAL + 20 )) taskset -c "$LOAD_CPU" "$OHA_BIN" --no-tui --worker-threads 1 -c "$LAT_CONNS" \
            -z "${LAT_CAL}s" --output-format json -o "$X/oha-capacity-$1.json" "$2" >"$X/oha-capacity-$1.log" 2>&1 || true
        jq -r '.summary.requestsPerSec // 0 | round' "$X/oha-capacity-$1.json" 2>/dev/null || echo 0
    }
    rate=${HALF_RPS:-}
    cap_direct=nan cap_spillway=nan
    if [[ -z "$rate" ]]; then
        cap_direct=$(oha_closed direct "http://127.0.0.1:$EXTRA_UP_PORT/")
        cap_spillway=$(oha_closed spillway "http://127.0.0.1:$EXTRA_PORT/")
        rate=$(( (cap_direct < cap_spillway ? cap_direct : cap_spillway) / 2 ))
        say "oha closed loop: direct $cap_direct req/s, through spillway $cap_spillway req/s -> half load $rate req/s (wrk direct small: $wrk_direct req/s)"
        sleep 1
    fi
    (( rate > 0 )) || fail "half-load rate is '$rate' (calibration failed? see $X/oha-capacity-*.log; or set HALF_RPS)"

    # oha_sample NAME URL -> appends "name rps p50 p99 p999 non2xx errors" to $X/latency.tsv
    printf 'round\ttarget\trate\trps\tp50_ms\tp99_ms\tp999_ms\tnon2xx\terrors\n' >"$X/latency.tsv"
    oha_sample() {
        local r=$1 name=$2 url=$3 out="$X/oha-r$1-$2.json"
        timeout $(( LAT_WARMUP + 15 )) taskset -c "$LOAD_CPU" "$OHA_BIN" --no-tui --worker-threads 1 \
            -q "$rate" -c "$LAT_CONNS" -z "${LAT_WARMUP}s" --output-format quiet "$url" >/dev/null 2>&1 || true
        timeout $(( LAT_DURATION + 30 )) taskset -c "$LOAD_CPU" "$OHA_BIN" --no-tui --worker-threads 1 \
            -q "$rate" -c "$LAT_CONNS" -z "${LAT_DURATION}s" --latency-correction \
            --output-format json -o "$out" "$url" >"$X/oha-r$r-$name.log" 2>&1 \
            || say "oha failed/timed out for $name (see $X/oha-r$r-$name.log)"
        [[ -s "$out" ]] || { say "no oha output for $name"; return 0; }
        jq -r --arg r "$r" --arg n "$name" --arg rate "$rate" '
            def ms(x): if x == null then "nan" else (x * 1000000 | round / 1000 | tostring) end;
            (.statusCodeDistribution // {}) as $s | (.errorDistribution // {}) as $e |
            ([$s | to_entries[] | select(.key | test("^2") | not) | .value] | add // 0) as $bad |
            ([$e | to_entries[] | select(.key != "aborted due to deadline") | .value] | add // 0) as $err |
            [ $r, $n, $rate, (.summary.requestsPerSec | round), ms(.latencyPercentiles.p50),
              ms(.latencyPercentiles.p99), ms(.latencyPercentiles["p99.9"]), $bad, $err ] | @tsv' \
            "$out" >>"$X/latency.tsv"
        say "r$r $name @ $rate/s: $(tail -1 "$X/latency.tsv" | awk -F'\t' '{ printf "rps=%s p50=%sms p99=%sms p99.9=%sms non2xx=%s errors=%s", $4, $5, $6, $7, $8, $9 }')"
    }
    for (( r = 1; r <= LAT_ROUNDS; r++ )); do
        oha_sample "$r" direct "http://127.0.0.1:$EXTRA_UP_PORT/"
        [[ $lat_targets == *nginx* ]] && oha_sample "$r" nginx "http://127.0.0.1:$EXTRA_NGINX_PORT/"
        oha_sample "$r" spillway "http://127.0.0.1:$EXTRA_PORT/"
    done
    loaded_hwm=$(status_kib VmHWM)
    stop_pid "$SPID"; stop_pid "$UPID"
    [[ -n "${NPID:-}" ]] && stop_pid "$NPID"

    med() { awk -F'\t' -v t="$1" -v c="$2" 'NR > 1 && $2 == t && $c != "nan" { print $c }' "$X/latency.tsv" | median_of; }
    {
        echo
        echo "== spillway extras (benches/load.sh; raw: $X) =="
        printf 'idle RSS:              %.1f MiB (VmRSS, %s s after GET /health through it answered 200; ready in %s ms; %s threads)\n' \
            "$(awk -v k="$idle_rss" 'BEGIN { print k / 1024 }')" "$IDLE_SETTLE" "$ready_ms" "$threads"
        printf 'peak RSS after load:   %.1f MiB (VmHWM)\n' "$(awk -v k="$loaded_hwm" 'BEGIN { print k / 1024 }')"
        if [[ -n "${HALF_RPS:-}" ]]; then echo "half load:             $rate req/s (HALF_RPS)"
        else echo "half load:             $rate req/s = half of the lower oha closed-loop rate (-c $LAT_CONNS, ${LAT_CAL}s): direct $cap_direct, through spillway $cap_spillway req/s (wrk direct small: $wrk_direct req/s)"; fi
        echo "                       oha -q $rate -c $LAT_CONNS -z ${LAT_DURATION}s --latency-correction GET / ; median over $LAT_ROUNDS round(s)"
        fmt='  %-9s %8s %9s %9s %9s %8s %7s\n'
        printf "$fmt" target rps "p50 ms" "p99 ms" "p99.9 ms" non2xx errors
        for t in $lat_targets; do
            printf "$fmt" "$t" "$(med "$t" 4)" "$(med "$t" 5)" "$(med "$t" 6)" "$(med "$t" 7)" "$(med "$t" 8)" "$(med "$t" 9)"
        done
        for t in $lat_targets; do
            [[ $t == direct ]] && continue
            awk -v t="$t" -v dp99="$(med direct 6)" -v sp99="$(med "$t" 6)" -v dp50="$(med direct 5)" -v sp50="$(med "$t" 5)" 'BEGIN {
                if (dp99 == "nan" || sp99 == "nan") { printf "added latency (%s): n/a (a sample is missing)\n", t; exit }
                printf "added latency (%s): p99 %+.3f ms, p50 %+.3f ms (%s - direct)\n", t, sp99 - dp99, sp50 - dp50, t }'
        done
        awk -v rate="$rate" -v d="$(med direct 4)" -v s="$(med spillway 4)" 'BEGIN {
            if (d != "nan" && d < 0.95 * rate) printf "WARNING: oha reached only %d of %d req/s direct: the client was the limit, latencies include its backlog\n", d, rate
            if (s != "nan" && s < 0.95 * rate) printf "WARNING: only %d of %d req/s through spillway: it could not keep up with half of direct\n", s, rate }'
    } >>"$REPORT"
    stop_watchdog
fi

echo
cat "$REPORT"
say "raw results: $RESULTS_DIR (raw.tsv, wrk-*.txt, */stderr.log$( (( EXTRAS )) && echo ', extras/'))"
exit "$harness_rc"
