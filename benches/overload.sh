#!/usr/bin/env bash
# benches/overload.sh — the harness's 3x-overload scenario (shared/bench/overload.sh) with
# three spillway configurations next to the reference targets.
#
#   bash benches/overload.sh                      # ~3 min 30 s with the defaults (+ build)
#   DURATION=3 WARMUP=1 CAL_DURATION=2 bash benches/overload.sh   # quick smoke run
#   VARIANTS="static" TARGETS="haproxy-shed" bash benches/overload.sh
#
# The harness takes one SPILLWAY_CONFIG per invocation and always calls that target
# `spillway`, and each invocation rewrites its results folder's raw.tsv, so this script runs
# it once per group, each into its own subfolder of one results folder:
#   plain/     BASELINE rows (app-max, direct@0.8x) + TARGETS (default: direct nginx-maxconns
#              haproxy haproxy-shed) + spillway with spillway-overload-unlimited.yaml
#   static/    spillway with spillway-overload-static.yaml   (max = the app's capacity + queue)
#   adaptive/  spillway with spillway-overload-adaptive.yaml (adaptive 4..256 + small queue)
# then copies each raw.tsv to raw-<group>.tsv with the target renamed spillway ->
# spillway-<variant>, and runs the harness's summarize-overload.sh over those copies.
# Finally, from oha's own JSON (which the harness keeps per target), a table of the latency
# of the non-2xx answers (the 503s / 502s of the shedding targets): raw.tsv only has the
# latency of 2xx answers.
#
# Knobs: VARIANTS (default "unlimited static adaptive"), TARGETS, BASELINE, RESULTS_DIR
# (default /tmp/bench-results/spillway-overload-<date>), SPILLWAY_BIN (skips the build),
# and every harness knob (DURATION WARMUP REPEAT CAPACITY WORK_MS FACTOR CLIENT_TIMEOUT
# CONNS QUEUE_TIMEOUT CAL_DURATION LOAD_CPU PROXY_CPU) passes through.
# All traffic stays on 127.0.0.1; each harness invocation has its own watchdog.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

VARIANTS=${VARIANTS:-unlimited static adaptive}
PLAIN_TARGETS=${TARGETS-direct nginx-maxconns haproxy haproxy-shed}
BASELINE=${BASELINE:-1}
OUT=${RESULTS_DIR:-/tmp/bench-results/spillway-overload-$(date +%Y%m%d-%H%M%S)}
ADMIN_PORT=${ADMIN_PORT:-19901}   # as in the spillway-overload-*.yaml configs
unset TARGETS RESULTS_DIR   # set per invocation below

for v in $VARIANTS; do
    [[ -f "$BENCHES_DIR/spillway-overload-$v.yaml" ]] || fail "unknown variant $v: no $BENCHES_DIR/spillway-overload-$v.yaml"
done
build_spillway
mkdir -p "$OUT"
say "harness: $HARNESS ; upstream: $UPSTREAM_BIN ; spillway: $SPILLWAY_BIN $SPILLWAY_ARGS ; results: $OUT"

# group NAME BASELINE TARGETS [VARIANT]: one harness invocation into $OUT/NAME
rc=0
group() {
    local name=$1 baseline=$2 targets=$3 variant=${4:-}
    local cfg=""
    [[ -n "$variant" ]] && cfg=$BENCHES_DIR/spillway-overload-$variant.yaml
    say "== $name: BASELINE=$baseline TARGETS='$targets'${variant:+ spillway config $(basename "$cfg")}"
    # An empty SPILLWAY_CONFIG keeps the harness from adding the spillway slot.
    # spillway's own clock for its answers: scrape its admin /metrics every second while the
    # harness runs (the harness stops spillway at the end), keeping the last good scrape.
    local poller=""
    if [[ -n "$variant" ]] && command -v curl >/dev/null; then
        mkdir -p "$OUT/$name"
        ( end=$(( SECONDS + 900 ))
          while (( SECONDS < end )); do
              curl -s --max-time 1 "http://127.0.0.1:$ADMIN_PORT/metrics" -o "$OUT/$name/.metrics.tmp" 2>/dev/null \
                  && [[ -s "$OUT/$name/.metrics.tmp" ]] && mv "$OUT/$name/.metrics.tmp" "$OUT/$name/metrics-last.txt"
              sleep 1
          done ) &
        poller=$!
    fi
    RESULTS_DIR=$OUT/$name BASELINE=$baseline TARGETS=$targets SPILLWAY_CONFIG=$cfg \
        bash "$HARNESS/overload.sh" || { rc=$?; say "harness overload.sh exited with $rc for $name"; }
    [[ -n "$poller" ]] && { kill "$poller" 2>/dev/null; wait "$poller" 2>/dev/null || true; }
    local raw=$OUT/$name/raw.tsv
    [[ -s "$raw" ]] || { say "no $raw"; return 0; }
    # The harness names the slot `spillway`; give each variant its own name in the copy.
    awk -F'\t' -v OFS='\t' -v new="spillway-${variant:-none}" 'NR > 1 && $2 == "spillway" { $2 = new } { print }' \
        "$raw" >"$OUT/raw-$name.tsv"
}

first=1
ts=$PLAIN_TARGETS v=""
[[ " $VARIANTS " == *" unlimited "* ]] && { ts="$ts spillway"; v=unlimited; }
# (the harness replaces an empty TARGETS by its default list, so never pass it empty)
if [[ -n "${ts// /}" ]]; then
    group plain "$BASELINE" "$ts" "$v"
    first=0
fi
for v in $VARIANTS; do
    [[ $v == unlimited ]] && continue
    # app-max/direct@0.8x only once (for %cap): in the first group
    b=0; (( first && BASELINE )) && b=1
    group "$v" "$b" spillway "$v"
    first=0
done

# groups in run order: plain first, then the variants as given
groups=(); [[ -d "$OUT/plain" ]] && groups+=(plain)
for v in $VARIANTS; do [[ $v != unlimited && -d "$OUT/$v" ]] && groups+=("$v"); done
ordered=()
for g in "${groups[@]}"; do [[ -f "$OUT/raw-$g.tsv" ]] && ordered+=("$OUT/raw-$g.tsv"); done
(( ${#ordered[@]} )) || fail "no results under $OUT"

# summarize-overload.sh pads target names to 14 characters; `spillway-unlimited` is longer
# and would shift its row. Re-pad the header and the data rows (second field a number or
# "closed") to the longest name; the footnotes pass through.
widen_target_column() {
    awk '{ line[NR] = $0; row[NR] = (NR == 1 || $2 ~ /^[0-9]+$/ || $2 == "closed")
           if (row[NR] && length($1) > w) w = length($1) }
         END { if (w < 14) w = 14
               for (i = 1; i <= NR; i++) {
                   if (!row[i]) { print line[i]; continue }
                   split(line[i], f, " "); n = length(f[1]); s = (n > 14) ? n + 1 : 15
                   printf "%-" w "s%s\n", f[1], substr(line[i], s) } }'
}

# p50/p99 of the non-2xx answers, from oha's JSON (with --stats-success-breakdown)
not_ok_latency() {
    local f t name g
    printf '%-20s %8s %8s %10s %10s\n' target non2xx "503" "p50 ms" "p99 ms"
    for g in "${groups[@]}"; do for f in "$OUT/$g"/r*-*/oha.json; do
        [[ -f "$f" ]] || continue
        name=$(basename "$(dirname "$f")"); name=${name#r*-}
        t=$name
        if [[ $name == spillway ]]; then t=spillway-$g; [[ $g == plain ]] && t=spillway-unlimited; fi
        jq -r --arg t "$t" '
            def ms(x): if x == null then "-" else (x * 1000000 | round / 1000 | tostring) end;
            (.statusCodeDistribution // {}) as $s |
            ([$s | to_entries[] | select(.key | test("^2") | not) | .value] | add // 0) as $bad |
            [ $t, $bad, ($s["503"] // 0), ms(.latencyPercentilesNotSuccessful.p50), ms(.latencyPercentilesNotSuccessful.p99) ] | @tsv' "$f" \
            | awk -F'\t' '{ printf "%-20s %8s %8s %10s %10s\n", $1, $2, $3, $4, $5 }'
    done; done
    echo "non2xx/503 = counts of those answers; p50/p99 = their latency from the intended send time (oha --latency-correction); - = none"
}

# spillway's own timing of its 503s: from its request-duration histogram (request handed to
# spillway's service -> response body done), the last scrape of each variant's last round.
own_shed_latency() {
    local g f
    printf '%-20s %8s %10s %10s %10s\n' target "503s" "<=0.5 ms" "<=1 ms" "<=2.5 ms"
    for g in "${groups[@]}"; do
        f=$OUT/$g/metrics-last.txt
        [[ -s "$f" ]] || continue
        awk -v t="spillway-$( [[ $g == plain ]] && echo unlimited || echo "$g" )" '
            /^spillway_request_duration_seconds_bucket\{/ && /code="503"/ {
                if (match($0, /le="[^"]*"/)) { le = substr($0, RSTART + 4, RLENGTH - 5); b[le] += $NF } }
            /^spillway_request_duration_seconds_count\{/ && /code="503"/ { n += $NF }
            END { if (n == 0) { printf "%-20s %8d %10s %10s %10s\n", t, 0, "-", "-", "-"; exit }
                  printf "%-20s %8d %9.2f%% %9.2f%% %9.2f%%\n", t, n, 100 * b["0.0005"] / n, 100 * b["0.001"] / n, 100 * b["0.0025"] / n }' "$f"
    done
    echo "share of spillway's 503s its own histogram puts within 0.5 / 1 / 2.5 ms (time inside spillway: from the parsed request to the end of the response; not the wait in socket buffers or in the client)"
}

{
    echo "== overload (harness overload.sh; summarize-overload.sh ${ordered[*]}) =="
    bash "$HARNESS/summarize-overload.sh" "${ordered[@]}" | widen_target_column
    echo
    echo "== latency of the non-2xx answers (oha JSON per target; not in raw.tsv) =="
    not_ok_latency
    echo
    echo "== spillway's 503s by its own clock (admin /metrics, last scrape) =="
    own_shed_latency
} | tee "$OUT/summary.txt"
say "raw results: $OUT (per group: <group>/raw.tsv, <group>/r<round>-<target>/{oha.json,<target>/stderr.log}; renamed copies raw-<group>.tsv; summary.txt)"
exit "$rc"
