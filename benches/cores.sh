#!/usr/bin/env bash
# benches/cores.sh — how spillway's cost per request changes from one core to several, next to
# nginx with as many workers, for a machine too small to show scaling itself (this project's
# is 2 cores; ../shared/bench/scale/ measures 1 to 8 cores where 16 are at hand).
#
#   bash benches/cores.sh base=target/release/spillway
#   ROUNDS=5 KS="1 2" CONNS=256 bash benches/cores.sh a=/path/a b=/path/b,SPILLWAY_X=1
#
# A target is NAME=BINARY[,VAR=VALUE...] (extra environment for that build). For each k in KS,
# round by round: nginx with k workers, then each build with k threads
# (TOKIO_WORKER_THREADS=k; k=1 runs the single-threaded scheduler, as a sidecar with one CPU
# does), each pinned to cores 0..k-1 (k=1: core PROXY_CPU). The upstream and wrk (-t2) float
# over all cores, so at k=2 on 2 cores they share the proxy's cores, as the issue's method asks.
# Per target: req/s, and the proxy's CPU time per request (user + system µs, from
# /proc/PID/stat around the wrk run), which shared-machine noise moves least. The figure to
# read is how CPU per request grows from k=1 to k=2 for spillway against nginx: work that
# every thread shares (atomics, locks, cross-thread wake-ups) shows up there.
# All traffic stays on 127.0.0.1; every step is bounded (wrk -d, timeout, a watchdog).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$HARNESS/lib.sh"

(( $# >= 1 )) || fail "usage: bash benches/cores.sh NAME=SPILLWAY_BINARY[,VAR=VALUE...] ..."
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-4}
CONNS=${CONNS:-256}
KS=${KS:-1 2}
PROXY_CPU=${PROXY_CPU:-1}
UP_PORT=${CORES_UP_PORT:-18290}
NGINX_PORT=${CORES_NGINX_PORT:-18291}
SP_PORT=${CORES_SPILLWAY_PORT:-18292}
ADMIN_PORT=${CORES_ADMIN_PORT:-19921}
OUT=${RESULTS_DIR:-/tmp/bench-results/spillway-cores-$(date +%Y%m%d-%H%M%S)}
require_tool wrk "apt-get install -y wrk"
require_tool nginx "apt-get install -y nginx"
check_ports_free "$UP_PORT" "$NGINX_PORT" "$SP_PORT" "$ADMIN_PORT"
names=() bins=() envs=()
for spec in "$@"; do
    [[ $spec == *=* ]] || fail "expected NAME=BINARY[,VAR=VALUE...], got '$spec'"
    IFS=, read -r bin extra <<<"${spec#*=}"
    [[ -x "$bin" ]] || fail "$bin is not executable"
    names+=("${spec%%=*}"); bins+=("$bin"); envs+=("${extra//,/ }")
done
mkdir -p "$OUT/nginx"
raise_nofile
n_ks=$(wc -w <<<"$KS")
guard_run $(( 60 + ROUNDS * n_ks * (1 + ${#bins[@]}) * (DURATION + 20) ))
all_cpus=0-$(( $(nproc) - 1 ))

start_bg upstream "$all_cpus" "$OUT/upstream.log" "$UPSTREAM_BIN" --listen "127.0.0.1:$UP_PORT" --threads 2
wait_http "http://127.0.0.1:$UP_PORT/health" 10 "$LAST_PID" || fail "upstream did not start"
render_load_config "$OUT/spillway.yaml" "$SP_PORT" "127.0.0.1:$UP_PORT" "$ADMIN_PORT"

cpu_ticks() { # PID -> "utime stime" in clock ticks, summed over PID and its descendants
    local u=0 s=0 p f
    for p in $(descendants "$1"); do
        f=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f12,13) || continue
        [[ -n "$f" ]] || continue
        u=$(( u + ${f% *} )); s=$(( s + ${f#* } ))
    done
    echo "$u $s"
}
# URL PID -> "req/s<TAB>CPU µs per request (user + system)"
measure() {
    local url=$1 pid=$2 before after out
    timeout 10 wrk -t2 -c"$CONNS" -d1s "$url" >/dev/null 2>&1 || true # warm the pools
    before=$(cpu_ticks "$pid")
    out=$(timeout $(( DURATION + 15 )) wrk -t2 -c"$CONNS" -d"${DURATION}s" "$url" 2>/dev/null) || true
    after=$(cpu_ticks "$pid")
    awk -v b="$before" -v a="$after" -v hz="$(getconf CLK_TCK)" '
        /^Requests\/sec/ { rps = int($2) } / requests in / { n = $1 }
        END {
            if (n == 0) { printf "0\t-\n"; exit }
            split(b, x, " "); split(a, y, " ")
            printf "%s\t%.2f\n", rps, (y[1] + y[2] - x[1] - x[2]) / hz / n * 1e6
        }' <<<"$out"
}
printf 'round\tk\ttarget\trps\tcpu_us\n' >"$OUT/cores.tsv"
for (( r = 1; r <= ROUNDS; r++ )); do
    for k in $KS; do
        cpus=0-$(( k - 1 )); (( k > 1 )) || cpus=$PROXY_CPU
        render_template "$CONF_DIR/nginx.conf.tmpl" "$OUT/nginx/nginx.conf" WORKERS="$k" NOFILE="$NOFILE" \
            RUNDIR="$OUT/nginx" UPSTREAM="127.0.0.1:$UP_PORT" SERVER_OPTS="" PORT="$NGINX_PORT"
        start_bg nginx "$cpus" "$OUT/nginx/stderr.log" nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" -e "$OUT/nginx/nginx-error.log"
        pid=$LAST_PID
        if wait_http "http://127.0.0.1:$NGINX_PORT/health" 10 "$pid"; then
            printf '%s\t%s\tnginx\t%s\n' "$r" "$k" "$(measure "http://127.0.0.1:$NGINX_PORT/" "$pid")" >>"$OUT/cores.tsv"
        fi
        stop_pid "$pid"
        for i in "${!bins[@]}"; do
            threads=(); (( k > 1 )) && threads=(TOKIO_WORKER_THREADS="$k")
            # shellcheck disable=SC2086 # envs[i] is a list of VAR=VALUE words
            start_bg "spillway-${names[$i]}" "$cpus" "$OUT/spillway-${names[$i]}-$k.log" \
                env RUST_LOG=warn,spillway::access=off "${threads[@]}" ${envs[$i]} \
                "${bins[$i]}" run --config "$OUT/spillway.yaml"
            pid=$LAST_PID
            if wait_http "http://127.0.0.1:$SP_PORT/health" 15 "$pid"; then
                printf '%s\t%s\t%s\t%s\n' "$r" "$k" "${names[$i]}" "$(measure "http://127.0.0.1:$SP_PORT/" "$pid")" >>"$OUT/cores.tsv"
            else
                say "${names[$i]} did not start (see $OUT/spillway-${names[$i]}-$k.log)"
            fi
            stop_pid "$pid"
        done
    done
    say "round $r: $(awk -F'\t' -v r="$r" '$1 == r { printf "%s@%s %s/%sus  ", $3, $2, $4, $5 }' "$OUT/cores.tsv")"
done

{
    echo "== medians over $ROUNDS rounds (wrk -t2 -c$CONNS -d${DURATION}s GET /, 64-byte body; $(nproc) cores) =="
    printf '%-12s %3s %10s %12s %12s\n' target k req/s cpu_us/req vs_nginx
    for k in $KS; do
        for name in nginx "${names[@]}"; do
            rps=$(awk -F'\t' -v t="$name" -v k="$k" 'NR > 1 && $2 == k && $3 == t { print $4 }' "$OUT/cores.tsv" | median_of)
            cpu=$(awk -F'\t' -v t="$name" -v k="$k" 'NR > 1 && $2 == k && $3 == t && $5 != "-" { print $5 }' "$OUT/cores.tsv" | median_of)
            ratio=$(awk -F'\t' -v t="$name" -v k="$k" 'NR > 1 && $2 == k { x[$1, $3] = $4 } END { for (i in x) { split(i, p, SUBSEP); if (p[2] == t && x[p[1], "nginx"] > 0) print x[i] / x[p[1], "nginx"] } }' "$OUT/cores.tsv" | median_of)
            printf '%-12s %3s %10s %12s %12.2f\n' "$name" "$k" "$rps" "$cpu" "$ratio"
        done
    done
} | tee "$OUT/report.txt"
stop_watchdog
