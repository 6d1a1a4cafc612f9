# scripts/lib.sh — shell helpers shared by the build and CI scripts. Sourced, not run:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
#
# Tools (installed from Debian when this runs as root where apt-get exists, else a clear error
# naming the package; every function returns non-zero on failure, so `set -e` callers stop):
#   need_tool TOOL [PACKAGE]      TOOL on PATH, or install PACKAGE (default: TOOL)
#   need_tools TOOL[:PACKAGE]...  the same for several tools, with one apt-get install
#   apt_install PACKAGE...        apt-get install -y -qq (DEBIAN_FRONTEND=noninteractive),
#                                 after one `apt-get update` per process
#   pip_install PACKAGE...        python3 -m pip install -q (--break-system-packages if needed)
#   need_pip_tool TOOL [PACKAGE]  TOOL from PyPI, with pip's scripts folder added to PATH
#
# The demo (`spillway demo`: the built-in sample app with spillway in front of it):
#   start_demo BIN WORKDIR [WRAPPER...]
#       writes WORKDIR/spillway.yaml, a copy of $DEMO_CONFIG (default config/demo.yaml) with
#       127.0.0.1:8080 (proxy), 127.0.0.1:8443 (a TLS listener, if any) and 127.0.0.1:9901
#       (admin) moved to free loopback ports and drain_delay 0s; starts
#       `[timeout $DEMO_TIMEOUT] [WRAPPER...] BIN demo --config WORKDIR/spillway.yaml` in the
#       background with RUST_LOG=$DEMO_RUST_LOG (default warn), output to WORKDIR/demo.log; waits
#       until it has printed its banner and the admin /healthz answers, and starts again on new
#       ports when it exits first (a port was taken meanwhile), three times at most.
#       Sets demo_pid, proxy, proxy_tls, admin (ports), demo_config and demo_log.
#       DEMO_TIMEOUT: seconds the demo may live at most (default 300; 0: no limit, the demo is
#       then this shell's direct child and alone gets stop_demo's signal). DEMO_WAIT: seconds
#       to wait for each start (default 20).
#       Call it in this shell, not in $(...): stop_demo can only reap a child of this shell.
#   stop_demo [SIGNAL]
#       sends SIGNAL (default INT: a clean shutdown) to the demo, waits up to 10 s for it to
#       exit, else kills it (and fails); reaps it. Does nothing when no demo runs, so it can sit
#       in an EXIT trap: trap 'stop_demo || true' EXIT.
#
# Everything listens on and talks to 127.0.0.1 only.
# shellcheck shell=bash

[[ -n ${_SPILLWAY_LIB_SOURCED:-} ]] && return 0
_SPILLWAY_LIB_SOURCED=1

SPILLWAY_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

_lib_say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

# --- tools -----------------------------------------------------------------------------------

_lib_apt_updated=

apt_install() { # PACKAGE...
    (($#)) || return 0
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        _lib_say "needs the Debian package(s) $* (apt-get install -y $*); not root or no apt-get here, so not installed"
        return 1
    fi
    if [[ -z $_lib_apt_updated ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
            || { _lib_say "apt-get update failed (needed to install $*)"; return 1; }
        _lib_apt_updated=1
    fi
    _lib_say "installing $* (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
        || { _lib_say "apt-get install -y $* failed"; return 1; }
}

need_tools() { # TOOL[:PACKAGE]...
    local spec tool pkg missing=() pkgs=()
    for spec in "$@"; do
        tool=${spec%%:*} pkg=${spec#*:}
        command -v "$tool" >/dev/null 2>&1 && continue
        missing+=("$tool:$pkg")
        [[ " ${pkgs[*]} " == *" $pkg "* ]] || pkgs+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    apt_install "${pkgs[@]}" || true
    local failed=0
    for spec in "${missing[@]}"; do
        tool=${spec%%:*} pkg=${spec#*:}
        command -v "$tool" >/dev/null 2>&1 && continue
        _lib_say "$tool is needed: install the Debian package $pkg (apt-get install -y $pkg) or put $tool on PATH"
        failed=1
    done
    return "$failed"
}

need_tool() { # TOOL [PACKAGE]
    need_tools "$1:${2:-$1}"
}

pip_install() { # PACKAGE...
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip || { _lib_say "pip is needed to install $*"; return 1; }
    fi
    python3 -m pip install -q --disable-pip-version-check "$@" >/dev/null 2>&1 \
        || python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@" \
        || { _lib_say "pip install $* failed"; return 1; }
}

need_pip_tool() { # TOOL [PACKAGE]
    local scripts
    # Where pip puts console scripts, in case it is not on PATH.
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    [[ :$PATH: == *":$scripts:"* ]] || export PATH="$PATH:$scripts"
    command -v "$1" >/dev/null 2>&1 && return 0
    pip_install "${2:-$1}" || return 1
    command -v "$1" >/dev/null 2>&1 \
        || { _lib_say "$1 is needed: pip install ${2:-$1} did not put it on PATH"; return 1; }
}

# --- the demo --------------------------------------------------------------------------------

demo_pid=

# free_ports N: N distinct loopback ports, picked at random below Linux's ephemeral range
# (32768-60999) among those that nothing accepts connections on.
free_ports() {
    local -a ports=()
    local p tries=0
    while ((${#ports[@]} < $1 && tries++ < 1000)); do
        p=$((20000 + RANDOM % 12768))
        [[ " ${ports[*]} " == *" $p "* ]] && continue
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
        ports+=("$p")
    done
    ((${#ports[@]} == $1)) || { _lib_say "found no free loopback ports"; return 1; }
    echo "${ports[*]}"
}

start_demo() { # BIN WORKDIR [WRAPPER...]
    local bin=$1 work=$2 attempt ports pid i
    shift 2
    local template=${DEMO_CONFIG:-$SPILLWAY_ROOT/config/demo.yaml}
    local rust_log=${DEMO_RUST_LOG:-warn} limit=${DEMO_TIMEOUT:-300} wait_s=${DEMO_WAIT:-20}
    local -a cmd=("$@" "$bin" demo)
    ((limit > 0)) && cmd=(timeout "$limit" "${cmd[@]}")
    need_tool curl || return 1
    demo_pid='' demo_config=$work/spillway.yaml demo_log=$work/demo.log
    for attempt in 1 2 3; do
        ports=$(free_ports 3) || return 1
        read -r proxy proxy_tls admin <<<"$ports"
        sed -e "s/127\.0\.0\.1:8080\b/127.0.0.1:$proxy/g" \
            -e "s/127\.0\.0\.1:8443\b/127.0.0.1:$proxy_tls/g" \
            -e "s/127\.0\.0\.1:9901\b/127.0.0.1:$admin/g" \
            -e 's/drain_delay: .*/drain_delay: 0s/' "$template" >"$demo_config"
        RUST_LOG=$rust_log "${cmd[@]}" --config "$demo_config" >"$demo_log" 2>&1 &
        pid=$!
        for ((i = 0; i < wait_s * 5; i++)); do
            # The banner is printed once everything is bound: this process, not another one
            # that holds the port, answers /healthz.
            if grep -qs '^spillway demo: sample app on' "$demo_log" \
                && curl -fsS --max-time 2 "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1; then
                demo_pid=$pid
                return 0
            fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
        wait "$pid" 2>/dev/null || true
        _lib_say "spillway demo did not start (attempt $attempt, ports $proxy $proxy_tls $admin)"
    done
    _lib_say "spillway demo ($bin) did not start; its output:"
    cat "$demo_log" >&2
    return 1
}

stop_demo() { # [SIGNAL]
    [[ -n $demo_pid ]] || return 0
    local pid=$demo_pid
    demo_pid=
    kill -"${1:-INT}" "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        # timeout leads its own process group: kill the demo in it too.
        kill -KILL -- "-$pid" 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        _lib_say "spillway demo did not stop within 10 s of SIG${1:-INT}; killed"
        return 1
    fi
    wait "$pid" 2>/dev/null || true
}
