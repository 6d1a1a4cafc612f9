# benches/common.sh — shared setup for benches/load.sh and benches/overload.sh. Sourced.
#
# Finds the reference harness (shared/bench beside the repository, or $BENCH_HARNESS),
# its upstream binary ($UPSTREAM_BIN), and builds spillway (unless $SPILLWAY_BIN is given).
# Exports what the harness reads: UPSTREAM_BIN, SPILLWAY_BIN, SPILLWAY_ARGS (and RUST_LOG).

BENCHES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCHES_DIR/.." && pwd)

say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
fail() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# --- the harness -----------------------------------------------------------------------------
HARNESS=${BENCH_HARNESS:-$BENCHES_DIR/../../shared/bench}
[[ -f "$HARNESS/run.sh" && -f "$HARNESS/overload.sh" && -f "$HARNESS/lib.sh" ]] \
    || fail "benchmark harness not found at $HARNESS (clone shared/ beside the repository, or set BENCH_HARNESS=/path/to/shared/bench)"
HARNESS=$(cd "$HARNESS" && pwd)

# --- the harness's upstream ------------------------------------------------------------------
# lib.sh uses $UPSTREAM_BIN, default <harness>/upstream/target/release/bench-upstream. The
# harness may be read-only (it is in the dev sandbox), so it can also be built elsewhere; we
# look in both places and build it into /tmp if neither has it.
UPSTREAM_TARGET_DIR=${UPSTREAM_TARGET_DIR:-/tmp/bench-upstream-target}
find_upstream_bin() {
    local c
    for c in "${UPSTREAM_BIN:-}" "$HARNESS/upstream/target/release/bench-upstream" \
             "$UPSTREAM_TARGET_DIR/release/bench-upstream"; do
        [[ -n "$c" && -x "$c" ]] && { echo "$c"; return 0; }
    done
    return 1
}
[[ -z "${UPSTREAM_BIN:-}" || -x "$UPSTREAM_BIN" ]] || fail "UPSTREAM_BIN=$UPSTREAM_BIN is not executable"
if ! UPSTREAM_BIN=$(find_upstream_bin); then
    say "building the harness upstream into $UPSTREAM_TARGET_DIR (~1 min)"
    (cd "$HARNESS/upstream" && CARGO_TARGET_DIR=$UPSTREAM_TARGET_DIR nice -n 10 cargo build --release --quiet) \
        || fail "could not build the harness upstream: (cd $HARNESS/upstream && CARGO_TARGET_DIR=$UPSTREAM_TARGET_DIR cargo build --release)"
    UPSTREAM_BIN=$UPSTREAM_TARGET_DIR/release/bench-upstream
fi
export UPSTREAM_BIN

# --- spillway --------------------------------------------------------------------------------
# SPILLWAY_BIN given: use it as is (no build). Otherwise `cargo build --release` here.
build_spillway() {
    if [[ -n "${SPILLWAY_BIN:-}" ]]; then
        [[ -x "$SPILLWAY_BIN" ]] || fail "SPILLWAY_BIN=$SPILLWAY_BIN is not executable"
    else
        say "building spillway (release) in $REPO_DIR"
        (cd "$REPO_DIR" && cargo build --release --bin spillway) || fail "cargo build --release failed"
        local target_dir=${CARGO_TARGET_DIR:-$REPO_DIR/target}
        [[ $target_dir == /* ]] || target_dir=$REPO_DIR/$target_dir
        SPILLWAY_BIN=$target_dir/release/spillway
        [[ -x "$SPILLWAY_BIN" ]] || fail "built, but $SPILLWAY_BIN is missing"
    fi
    export SPILLWAY_BIN
    export SPILLWAY_ARGS=${SPILLWAY_ARGS:-run --config {config}}
    # The harness's nginx/HAProxy configs write nothing per request; for a like-for-like
    # comparison spillway's access log is off too (set RUST_LOG to change it).
    export RUST_LOG=${RUST_LOG:-info,spillway::access=off}
}

# render_config IN OUT KEY=VALUE... : replaces each @KEY@ (as the harness does for the slot)
render_config() {
    local in=$1 out=$2 kv; shift 2
    local -a args=()
    for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${args[@]}" "$in" >"$out"
}

# guard_run SECONDS: stops everything started with start_bg when the script exits (also on
# Ctrl-C), and aborts the script after SECONDS. The harness's stop_watchdog fails when called a
# second time (its `kill` is the last command of an && list); under `set -e` that would end
# the EXIT trap before cleanup_all, leaving the upstream and the proxies running.
guard_run() {
    trap 'stop_watchdog || true; cleanup_all' EXIT
    trap 'exit 130' INT TERM
    start_watchdog "$1"
}

# render_load_config OUT PORT UPSTREAM ADMIN_PORT: benches/spillway-load.yaml for a
# listener on PORT, the upstream at UPSTREAM and the admin API on ADMIN_PORT.
render_load_config() {
    render_config "$BENCHES_DIR/spillway-load.yaml" "$1" PORT="$2" UPSTREAM="$3"
    sed -i "s/127.0.0.1:19901/127.0.0.1:$4/" "$1"
}
