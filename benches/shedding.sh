#!/usr/bin/env bash
# benches/shedding.sh — how spillway's queue and priorities shed load, next to HAProxy's queue,
# in one run: the harness's capacity-limited app (32 slots x 20 ms = 1600/s nominal), open-loop
# load from benches/shed_load.rs (latency from each request's due time, 1 s client timeout).
#
#   bash benches/shedding.sh                          # ~17 min with the defaults (+ builds)
#   ROUNDS=1 DURATION=5 bash benches/shedding.sh      # quick smoke run, ~2 min
#   SCENARIOS="burst" TARGETS="spillway-queue spillway-q0" bash benches/shedding.sh
#
# Scenarios (offered rates are multiples of the nominal 1600/s, as the harness's overload.sh):
#   unloaded  0.5x (800/s): the latency of each target when nothing is shed
#   overload  3x (4800/s), constant
#   burst     average 0.8x (1280/s): 1067/s with bursts of 2x that (2133/s) for 200 ms every
#             second
#   mix       3x (4800/s), 20 % `x-priority: critical` and 80 % `x-priority: sheddable`
#             (also at 0.5x in `unloaded`, for the targets that read it)
# Targets:
#   haproxy-shed       server maxconn 32 + timeout queue QUEUE_TIMEOUT + option abortonclose
#                      (the harness's config): HAProxy queues, then answers 503
#   spillway-q0        adaptive limit 4..256, no queue (spillway-overload-adaptive.yaml)
#   spillway-queue     adaptive limit, queue 64, queue_timeout QUEUE_TIMEOUT (the README's
#                      queue example; spillway-shed-queue.yaml)
#   spillway-priority  spillway-queue + priority_header x-priority (spillway-shed-priority.yaml):
#                      only in unloaded and mix
#   spillway-deepq     queue 256, queue_timeout 200ms, queue_interval 1s
#                      (spillway-shed-deepqueue.yaml): what absorbing the bursts whole takes,
#                      and what it costs under sustained overload; not in mix
# Each (round, scenario, target) gets a fresh app and proxy, WARMUP s at half capacity, then
# DURATION s measured. Before the rounds, `app-max`: wrk closed loop with exactly 32 connections
# straight to the app, the app's real capacity (a 20 ms sleep takes ~21.7 ms), for %cap.
#
# Knobs: ROUNDS (3), DURATION (15), WARMUP (2), SCENARIOS, TARGETS, QUEUE_TIMEOUT (100ms),
# CONNS (5000), CLIENT_TIMEOUT (1, seconds), TRACE (1: each run's trace.tsv, one line per
# request: ms into the run, class, status, latency), RESULTS_DIR, SPILLWAY_BIN (skips the build),
# LOAD_CPU/PROXY_CPU (the harness's pinning: generator + app on core 0, proxy on core 1).
# Output: RESULTS_DIR (default /tmp/bench-results/spillway-shedding-<date>)/raw.tsv (one line
# per round, scenario, target and class) and summary.txt (medians over the rounds).
# All traffic stays on 127.0.0.1; every step is bounded (the generator's schedule and client
# timeout, `timeout` around each step, and a watchdog over the whole script).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# The harness helpers: start_bg (pinned, tracked), start_proxy, stop_pid, wait_http,
# raise_nofile, watchdog, cleanup_all. Sourcing only defines things.
source "$HARNESS/lib.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-15}
WARMUP=${WARMUP:-2}
SCENARIOS=${SCENARIOS:-unloaded overload burst mix}
TARGETS=${TARGETS:-haproxy-shed spillway-q0 spillway-queue spillway-priority spillway-deepq}
QUEUE_TIMEOUT=${QUEUE_TIMEOUT:-100ms}
CONNS=${CONNS:-5000}
CLIENT_TIMEOUT=${CLIENT_TIMEOUT:-1}
TRACE=${TRACE:-1}                   # one line per request in each run's trace.tsv
CAPACITY=32
WORK_MS=20
CAP_RPS=$(( CAPACITY * 1000 / WORK_MS ))
OUT=${RESULTS_DIR:-/tmp/bench-results/spillway-shedding-$(date +%Y%m%d-%H%M%S)}
unset RESULTS_DIR

declare -A CONFIG_OF=(
    [spillway-q0]=spillway-overload-adaptive.yaml
    [spillway-queue]=spillway-shed-queue.yaml
    [spillway-priority]=spillway-shed-priority.yaml
    [spillway-deepq]=spillway-shed-deepqueue.yaml
)

require_tool wrk "apt-get install -y wrk"
require_tool jq "apt-get install -y jq"
require_tool curl "apt-get install -y curl"
check_upstream_bin
raise_nofile 65536
(( NOFILE >= 2 * CONNS + 200 )) || { CONNS=$(( (NOFILE - 200) / 2 )); say "open-file limit $NOFILE: CONNS lowered to $CONNS"; }
build_spillway
say "building the load generator (benches/shed_load.rs)"
LOAD_BIN=$(cd "$REPO_DIR" && cargo build --release --bench shed_load --message-format=json-render-diagnostics \
    | jq -r 'select(.reason == "compiler-artifact" and .target.name == "shed_load") | .executable') \
    || fail "could not build the load generator: (cd $REPO_DIR && cargo build --release --bench shed_load)"
[[ -x "$LOAD_BIN" ]] || fail "built, but the load generator ('$LOAD_BIN') is missing"

# The runs of one round, in order: "scenario target".
plan=()
for s in $SCENARIOS; do
    for t in $TARGETS; do
        case $s:$t in
            overload:spillway-priority | burst:spillway-priority) continue ;;
            mix:spillway-q0 | mix:spillway-queue | mix:spillway-deepq) continue ;;
        esac
        plan+=("$s $t")
    done
done
(( ${#plan[@]} )) || fail "nothing to run for SCENARIOS='$SCENARIOS' TARGETS='$TARGETS'"
budget=$(( 60 + ROUNDS * ${#plan[@]} * (DURATION + WARMUP + 40) ))
mkdir -p "$OUT"
guard_run "$budget"
check_ports_free "$UP_PORT" "${PORT_OF[spillway]}" "${PORT_OF[haproxy-shed]}" 19901
say "results -> $OUT ; ${#plan[@]} runs x $ROUNDS rounds of ${DURATION}s (+${WARMUP}s warm-up); hard cap ${budget}s"
{
    echo "date: $(date -Is)"; echo "kernel: $(uname -r)"; echo "nproc: $(nproc)"
    echo "commit: $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO_DIR" diff --quiet 2>/dev/null || echo '+dirty')"
    echo "haproxy: $(haproxy -v 2>&1 | head -1)"
    echo "spillway: $SPILLWAY_BIN"
    echo "settings: ROUNDS=$ROUNDS DURATION=$DURATION WARMUP=$WARMUP QUEUE_TIMEOUT=$QUEUE_TIMEOUT CONNS=$CONNS CLIENT_TIMEOUT=$CLIENT_TIMEOUT LOAD_CPU=$LOAD_CPU PROXY_CPU=$PROXY_CPU"
    echo "loadavg at start: $(cat /proc/loadavg)"
} >"$OUT/env.txt"

start_app() { # dir
    start_bg upstream "$LOAD_CPU" "$1/upstream.log" "$UPSTREAM_BIN" --listen "$UP_HOST:$UP_PORT" --threads 1 --capacity "$CAPACITY"
    APP_PID=$LAST_PID
    wait_http "http://$UP_HOST:$UP_PORT/health" 10 "$APP_PID"
}

# ---- app-max: the app's real capacity --------------------------------------------------------
d=$OUT/app-max; mkdir -p "$d"
start_app "$d" || fail "the app did not start (see $d/upstream.log)"
timeout 30 taskset -c "$LOAD_CPU" wrk -t1 -c"$CAPACITY" -d5s "http://$UP_HOST:$UP_PORT/delay?ms=$WORK_MS" >"$d/wrk.txt" 2>&1 || true
stop_pid "$APP_PID"
APP_MAX=$(awk '/^Requests\/sec:/ { printf "%d", $2 }' "$d/wrk.txt")
[[ -n "$APP_MAX" && "$APP_MAX" -gt 0 ]] || fail "no app-max figure (see $d/wrk.txt)"
say "app-max: $APP_MAX req/s (closed loop, $CAPACITY connections)"
echo "app_max_rps: $APP_MAX" >>"$OUT/env.txt"

# ---- the runs --------------------------------------------------------------------------------
TSV=$OUT/raw.tsv
printf 'round\tscenario\ttarget\tclass\tsent\tc2xx\tc503\tc_other\ttimeouts\terrors\tp50_ms\tp99_ms\tp999_ms\tra_min\tra_median\tra_max\tra_distinct\n' >"$TSV"

run_one() { # round scenario target
    local r=$1 s=$2 t=$3 d="$OUT/r$1-$2-$3"
    mkdir -p "$d"
    local -a load=(--target "127.0.0.1:PORT" --path "/delay?ms=$WORK_MS" --duration "$DURATION"
                   --warmup "$WARMUP" --warmup-rate $(( CAP_RPS / 2 )) --conns "$CONNS" --timeout "$CLIENT_TIMEOUT")
    local mix=""
    [[ $s == mix || ( $s == unloaded && $t == spillway-priority ) ]] && mix="critical=0.2,sheddable=0.8"
    case $s in
        unloaded) load+=(--rate $(( CAP_RPS / 2 ))) ;;
        overload|mix) load+=(--rate $(( CAP_RPS * 3 ))) ;;
        # average 0.8x: r x 0.8 + 2r x 0.2 = 1.2 r = 0.8 x 1600 -> r = 1067
        burst) load+=(--rate 1067 --burst-rate 2133 --burst-ms 200 --period-ms 1000) ;;
    esac
    [[ -n "$mix" ]] && load+=(--header x-priority --mix "$mix")
    start_app "$d" || { say "app failed to start for $s/$t"; return 1; }
    local ok=0
    case $t in
        haproxy-shed) start_proxy haproxy-shed "$d" "maxconn $CAPACITY" "$QUEUE_TIMEOUT" && ok=1 ;;
        spillway-*) SPILLWAY_CONFIG=$BENCHES_DIR/${CONFIG_OF[$t]} start_proxy spillway "$d" "" "$QUEUE_TIMEOUT" && ok=1 ;;
    esac
    if (( ! ok )); then say "$t failed to start for $s (see $d/)"; stop_pid "$APP_PID"; return 1; fi
    load[1]=127.0.0.1:$PROXY_PORT
    (( TRACE )) && load+=(--trace "$d/trace.tsv")
    timeout $(( WARMUP + DURATION + 30 )) taskset -c "$LOAD_CPU" "$LOAD_BIN" "${load[@]}" >"$d/load.txt" 2>"$d/load.err" \
        || say "the load generator failed for $s/$t (see $d/load.err)"
    if [[ $t == spillway-* ]]; then
        curl -s --max-time 2 "http://127.0.0.1:19901/metrics" -o "$d/metrics.txt" || true
    fi
    stop_pid "$PROXY_PID"
    stop_pid "$APP_PID"
    awk -F'\t' -v OFS='\t' -v r="$r" -v s="$s" -v t="$t" '$1 == "CLASS" || $1 == "TOTAL" { $1 = r OFS s OFS t; print }' \
        "$d/load.txt" >>"$TSV"
    say "r$r $s $t: $(awk -F'\t' '$1 == "TOTAL" { printf "sent %s 2xx %s 503 %s other %s timeouts %s errors %s p50 %s p99 %s ms", $3, $4, $5, $6, $7, $8, $9, $10 }' "$d/load.txt")"
}

for (( r = 1; r <= ROUNDS; r++ )); do
    # Rotate the order each round, so that a noisy stretch of the machine is shared out.
    n=${#plan[@]}
    for (( i = 0; i < n; i++ )); do
        read -r s t <<<"${plan[$(( (i + r - 1) % n ))]}"
        run_one "$r" "$s" "$t" || true
    done
done
echo "loadavg at end: $(cat /proc/loadavg)" >>"$OUT/env.txt"

# ---- summary: medians over the rounds ------------------------------------------------------------
summarize() {
    awk -F'\t' -v dur="$DURATION" -v cap="$APP_MAX" '
        function median(key,    n, i, j, v, tmp) {
            n = split(vals[key], v, " ")
            for (i = 2; i <= n; i++) { tmp = v[i]; for (j = i - 1; j >= 1 && v[j] + 0 > tmp + 0; j--) v[j + 1] = v[j]; v[j + 1] = tmp }
            if (n == 0) return "-"
            return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        }
        function add(key, x) { vals[key] = (key in vals) ? vals[key] " " x : x }
        NR == 1 { next }
        {
            k = $2 SUBSEP $3 SUBSEP $4
            if (!(k in seen)) { seen[k] = 1; order[++rows] = k }
            add(k SUBSEP "sent", $5 / dur); add(k SUBSEP "ok", $6 / dur); add(k SUBSEP "c503", $7)
            add(k SUBSEP "other", $8 + $9 + $10); add(k SUBSEP "p50", $11); add(k SUBSEP "p99", $12)
            add(k SUBSEP "okpct", $5 ? 100 * $6 / $5 : 0)
            if ($4 == "total" && $2 == "unloaded") add($3 SUBSEP "unloaded_p99", $12)
            if ($4 == "critical" && $2 == "unloaded") add($3 SUBSEP "unloaded_crit_p99", $12)
            ra[k] = $14 "-" $16 " (" $17 ")"
        }
        END {
            printf "%-9s %-18s %-10s %8s %8s %6s %7s %8s %8s %7s %7s %7s %s\n", "scenario", "target", "class", "sent/s", "2xx/s", "%cap", "2xx%", "503s", "other", "p50", "p99", "p99/un", "Retry-After"
            for (i = 1; i <= rows; i++) {
                split(order[i], f, SUBSEP); k = order[i]
                ok = median(k SUBSEP "ok"); p99 = median(k SUBSEP "p99")
                un = (f[3] == "critical") ? median(f[2] SUBSEP "unloaded_crit_p99") : median(f[2] SUBSEP "unloaded_p99")
                rel = (un != "-" && un + 0 > 0 && p99 != "nan") ? sprintf("%.2f", p99 / un) : "-"
                printf "%-9s %-18s %-10s %8.0f %8.0f %6.1f %7.1f %8d %8d %7s %7s %7s %s\n", f[1], f[2], f[3], median(k SUBSEP "sent"), ok, 100 * ok / cap, median(k SUBSEP "okpct"), median(k SUBSEP "c503"), median(k SUBSEP "other"), median(k SUBSEP "p50"), p99, rel, ra[k]
            }
        }' "$TSV"
    echo "medians over $ROUNDS round(s) of ${DURATION}s; app-max $APP_MAX req/s (%cap = 2xx/s over it); 2xx% = share of that class's requests answered 2xx;"
    echo "p50/p99 in ms of the 2xx answers, from each request's due time; p99/un = p99 over the same target's p99 in 'unloaded' (critical: over its critical p99 there);"
    echo "other = other statuses + client timeouts (${CLIENT_TIMEOUT}s) + errors; Retry-After = min-max (distinct values) of the 503s in the last round"
}
summarize | tee "$OUT/summary.txt"
say "raw results: $OUT (raw.tsv; per run r<round>-<scenario>-<target>/: load.txt, logs, configs, metrics.txt)"
