#!/usr/bin/env bash
# benches/ab.sh — A/B throughput of spillway builds against each other and nginx, interleaved
# round by round, for deciding whether a change to the hot path pays. On a shared, noisy
# machine only comparisons within one round mean much: read the per-round ratios.
#
#   bash benches/ab.sh old=/tmp/spillway-before new=target/release/spillway
#   ROUNDS=6 DURATION=3 CONNS=64 bash benches/ab.sh a=/path/a b=/path/b
#   bash benches/ab.sh off=target/release/spillway on=target/release/spillway,info \
#       sampled=target/release/spillway,info,benches/access-log-sampled.yaml
#
# A target is NAME=BINARY[,RUST_LOG[,EXTRA_YAML]]: RUST_LOG defaults to
# warn,spillway::access=off (no access log); EXTRA_YAML is a file of top-level config keys
# appended to that target's copy of the config (e.g. an access_log section).
#
# Each round: wrk straight to the upstream, through nginx (1 worker, the harness's config),
# then through each build (started fresh with benches/spillway-load.yaml, access log off
# unless the target says otherwise; its log goes to a file, as a sidecar's to its log agent).
# The upstream and wrk share LOAD_CPU; every proxy is pinned alone to PROXY_CPU, as in
# benches/load.sh. Prints req/s per round and target, then for each build the median over
# the rounds of its ratio to nginx and to the first build in the same round, and each proxy's
# CPU time per request (user and system, from /proc/PID/stat around each wrk run), the figure
# that noise from other jobs moves least.
# All traffic stays on 127.0.0.1; every step is bounded (wrk -d, timeout, a watchdog).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$HARNESS/lib.sh"

(( $# >= 1 )) || fail "usage: bash benches/ab.sh NAME=SPILLWAY_BINARY [NAME=SPILLWAY_BINARY ...]"
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-3}
CONNS=${CONNS:-64}
LOAD_CPU=${LOAD_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
UP_PORT=${AB_UP_PORT:-18190}
NGINX_PORT=${AB_NGINX_PORT:-18191}
SP_PORT=${AB_SPILLWAY_PORT:-18192}
ADMIN_PORT=${AB_ADMIN_PORT:-19911}
OUT=${RESULTS_DIR:-/tmp/bench-results/spillway-ab-$(date +%Y%m%d-%H%M%S)}
require_tool wrk "apt-get install -y wrk"
require_tool nginx "apt-get install -y nginx"
check_ports_free "$UP_PORT" "$NGINX_PORT" "$SP_PORT" "$ADMIN_PORT"
names=() bins=() logs=() extras=()
for spec in "$@"; do
    [[ $spec == *=* ]] || fail "expected NAME=BINARY[,RUST_LOG[,EXTRA_YAML]], got '$spec'"
    IFS=, read -r bin log extra <<<"${spec#*=}"
    [[ -x "$bin" ]] || fail "$bin is not executable"
    [[ -z "$extra" || -f "$extra" ]] || fail "$extra is not a file"
    names+=("${spec%%=*}"); bins+=("$bin"); logs+=("${log:-warn,spillway::access=off}"); extras+=("$extra")
done
mkdir -p "$OUT/nginx"
raise_nofile
guard_run $(( 60 + ROUNDS * (2 + ${#bins[@]}) * (DURATION + 15) ))

start_bg upstream "$LOAD_CPU" "$OUT/upstream.log" "$UPSTREAM_BIN" --listen "127.0.0.1:$UP_PORT" --threads 1
wait_http "http://127.0.0.1:$UP_PORT/health" 10 "$LAST_PID" || fail "upstream did not start"
render_template "$CONF_DIR/nginx.conf.tmpl" "$OUT/nginx/nginx.conf" WORKERS=1 NOFILE="$NOFILE" \
    RUNDIR="$OUT/nginx" UPSTREAM="127.0.0.1:$UP_PORT" SERVER_OPTS="" PORT="$NGINX_PORT"
start_bg nginx "$PROXY_CPU" "$OUT/nginx/stderr.log" nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" -e "$OUT/nginx/nginx-error.log"
NGINX_PID=$LAST_PID
wait_http "http://127.0.0.1:$NGINX_PORT/health" 10 "$LAST_PID" || fail "nginx did not start"
render_load_config "$OUT/spillway.yaml" "$SP_PORT" "127.0.0.1:$UP_PORT" "$ADMIN_PORT"
for i in "${!names[@]}"; do
    cp "$OUT/spillway.yaml" "$OUT/spillway-${names[$i]}.yaml"
    [[ -z "${extras[$i]}" ]] || cat "${extras[$i]}" >>"$OUT/spillway-${names[$i]}.yaml"
done

cpu_ticks() { # PID -> "utime stime" in clock ticks, summed over PID and its descendants
    local u=0 s=0 p f
    for p in $(descendants "$1"); do
        # Fields after the ") " that closes the command name: utime and stime are 12th and 13th.
        f=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f12,13) || continue
        [[ -n "$f" ]] || continue
        u=$(( u + ${f% *} )); s=$(( s + ${f#* } ))
    done
    echo "$u $s"
}
# URL [PID] -> "req/s<TAB>user µs per request<TAB>system µs per request" (CPU of PID's tree
# during the run; "-" without a PID). CPU time per request hardly moves when other jobs steal
# the core, which req/s does.
measure() {
    local url=$1 pid=${2:-} before="" after="" out
    [[ -n "$pid" ]] && before=$(cpu_ticks "$pid")
    out=$(timeout $(( DURATION + 15 )) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" "$url" 2>/dev/null) || true
    [[ -n "$pid" ]] && after=$(cpu_ticks "$pid")
    awk -v b="$before" -v a="$after" -v hz="$(getconf CLK_TCK)" '
        /^Requests\/sec/ { rps = int($2) } / requests in / { n = $1 }
        END {
            if (b == "" || n == 0) { printf "%s\t-\t-\n", rps; exit }
            split(b, x, " "); split(a, y, " ")
            printf "%s\t%.2f\t%.2f\n", rps, (y[1] - x[1]) / hz / n * 1e6, (y[2] - x[2]) / hz / n * 1e6
        }' <<<"$out"
}
printf 'round\ttarget\trps\tuser_us\tsys_us\n' >"$OUT/ab.tsv"
for (( r = 1; r <= ROUNDS; r++ )); do
    printf '%s\tdirect\t%s\n' "$r" "$(measure "http://127.0.0.1:$UP_PORT/")" >>"$OUT/ab.tsv"
    printf '%s\tnginx\t%s\n' "$r" "$(measure "http://127.0.0.1:$NGINX_PORT/" "$NGINX_PID")" >>"$OUT/ab.tsv"
    for i in "${!bins[@]}"; do
        start_bg "spillway-${names[$i]}" "$PROXY_CPU" "$OUT/spillway-${names[$i]}.log" \
            env RUST_LOG="${logs[$i]}" "${bins[$i]}" run --config "$OUT/spillway-${names[$i]}.yaml"
        pid=$LAST_PID
        if wait_http "http://127.0.0.1:$SP_PORT/health" 15 "$pid"; then
            printf '%s\t%s\t%s\n' "$r" "${names[$i]}" "$(measure "http://127.0.0.1:$SP_PORT/" "$pid")" >>"$OUT/ab.tsv"
        else
            say "${names[$i]} did not start (see $OUT/spillway-${names[$i]}.log)"
        fi
        stop_pid "$pid"
    done
    say "round $r: $(awk -F'\t' -v r="$r" '$1 == r { printf "%s %s  ", $2, $3 }' "$OUT/ab.tsv")"
done

{
    echo "== req/s per round (wrk -t1 -c$CONNS -d${DURATION}s GET /, 64-byte body) =="
    awk -F'\t' 'NR > 1 { v[$2] = v[$2] sprintf("%8s", $3); if (!($2 in seen)) { seen[$2] = 1; order[++n] = $2 } }
                END { for (i = 1; i <= n; i++) printf "%-12s%s\n", order[i], v[order[i]] }' "$OUT/ab.tsv"
    echo
    echo "== medians over rounds of the per-round ratios =="
    for name in "${names[@]}"; do
        vs_nginx=$(awk -F'\t' -v t="$name" 'NR > 1 { x[$1, $2] = $3 } END { for (k in x) { split(k, p, SUBSEP); if (p[2] == t && x[p[1], "nginx"] > 0) print x[k] / x[p[1], "nginx"] } }' "$OUT/ab.tsv" | median_of)
        vs_first=$(awk -F'\t' -v t="$name" -v f="${names[0]}" 'NR > 1 { x[$1, $2] = $3 } END { for (k in x) { split(k, p, SUBSEP); if (p[2] == t && x[p[1], f] > 0) print x[k] / x[p[1], f] } }' "$OUT/ab.tsv" | median_of)
        printf '%-12s vs nginx %.2f   vs %s %.2f\n' "$name" "$vs_nginx" "${names[0]}" "$vs_first"
    done
    echo
    echo "== CPU per request, median over rounds (user + system µs; less is better) =="
    for name in nginx "${names[@]}"; do
        u=$(awk -F'\t' -v t="$name" 'NR > 1 && $2 == t && $4 != "-" { print $4 }' "$OUT/ab.tsv" | median_of)
        k=$(awk -F'\t' -v t="$name" 'NR > 1 && $2 == t && $5 != "-" { print $5 }' "$OUT/ab.tsv" | median_of)
        tot=$(awk -F'\t' -v t="$name" 'NR > 1 && $2 == t && $4 != "-" { print $4 + $5 }' "$OUT/ab.tsv" | median_of)
        printf '%-12s user %6.2f   system %6.2f   total %6.2f\n' "$name" "$u" "$k" "$tot"
    done
} | tee "$OUT/report.txt"
stop_watchdog
