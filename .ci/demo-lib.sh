# Sourced by the .ci checks that need a running `spillway demo`.
#
# start_demo BIN WORKDIR: starts `BIN demo` with config/demo.yaml rewritten to free loopback
# ports (drain_delay 0s), waits until admin /healthz answers, retrying with new ports when a
# picked port was taken meanwhile. Sets demo_pid, proxy and admin; the demo's output goes to
# WORKDIR/out.log. The caller stops it (kill "$demo_pid").

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_demo() {
  local bin=$1 work=$2 attempt
  demo_pid=
  for attempt in 1 2 3; do
    proxy=$(free_port); admin=$(free_port)
    sed -e "s/127.0.0.1:8080/127.0.0.1:$proxy/" -e "s/127.0.0.1:9901/127.0.0.1:$admin/" \
        -e 's/drain_delay: .*/drain_delay: 0s/' config/demo.yaml > "$work/spillway.yaml"
    RUST_LOG=warn timeout 300 "$bin" demo --config "$work/spillway.yaml" >"$work/out.log" 2>&1 &
    demo_pid=$!
    for _ in $(seq 1 50); do
      curl -fsS "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1 && return 0
      sleep 0.2
    done
    kill "$demo_pid" 2>/dev/null || true; wait "$demo_pid" 2>/dev/null || true; demo_pid=
  done
  echo "spillway demo did not start:"; cat "$work/out.log"
  return 1
}
