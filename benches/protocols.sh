#!/usr/bin/env bash
# benches/protocols.sh — TLS handshake rate and HTTP/2 multiplexed throughput through spillway
# next to nginx (TLS + http2 listener, same certificate, same upstream) in one run.
#
#   bash benches/protocols.sh                  # ~1 min (+ build)
#   ROUNDS=3 bash benches/protocols.sh         # medians over 3 rounds
#
# Cases (h2load, pinned to the load core with the upstream; proxies on the proxy core):
#   handshake  TLS 1.3 + h2, a fresh connection per request: -n HS_N -c HS_N -m 1 (HS_N
#              clients, one connection and one request each)
#   h2mux      one TLS h2 connection per client, MUX_M streams in flight on each:
#              -c MUX_C -m MUX_M -D MUX_D s, GET / (64-byte body from the upstream)
# Reported: requests/s (handshake case: ≈ new TLS connections/s), mean and max latency as
# h2load prints them, and the ratio spillway / nginx.
# All traffic on 127.0.0.1; everything bounded (h2load -D, a watchdog).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$HARNESS/lib.sh"

ROUNDS=${ROUNDS:-1}
LOAD_CPU=${LOAD_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
HS_N=${HS_N:-2000}
MUX_D=${MUX_D:-8}
MUX_C=${MUX_C:-4}
MUX_M=${MUX_M:-32}
UP_PORT=${UP_PORT:-18280}
NGINX_PORT=${NGINX_PORT:-18281}
SPILLWAY_PORT=${SPILLWAY_PORT:-18282}
OUT=${RESULTS_DIR:-/tmp/bench-results/spillway-protocols-$(date +%Y%m%d-%H%M%S)}

require_tool h2load "apt-get install -y nghttp2-client"
require_tool nginx "apt-get install -y nginx"
require_tool openssl "apt-get install -y openssl"
build_spillway
check_ports_free "$UP_PORT" "$NGINX_PORT" "$SPILLWAY_PORT"
mkdir -p "$OUT"
guard_run $(( 60 + ROUNDS * 2 * (MUX_D + 80) ))

# One self-signed P-256 certificate for both proxies (ECDSA: the handshake cost most
# deployments pay today).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null

cat >"$OUT/nginx.conf" <<NGINX
worker_processes 1;
error_log $OUT/nginx-error.log warn;
pid $OUT/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    upstream app { server 127.0.0.1:$UP_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$NGINX_PORT ssl http2;
        ssl_certificate $OUT/cert.pem;
        ssl_certificate_key $OUT/key.pem;
        ssl_protocols TLSv1.3;
        # The default (1000) ends an h2 connection after 1000 requests, and h2load does not
        # reconnect: lift it so both proxies serve the whole run on the same connections.
        keepalive_requests 100000000;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGINX

cat >"$OUT/spillway.yaml" <<YAML
server_id: spillway-bench
listeners:
  - name: https
    address: 127.0.0.1:$SPILLWAY_PORT
    tls: { cert_file: $OUT/cert.pem, key_file: $OUT/key.pem }
admin:
  address: 127.0.0.1:19921
upstreams:
  app:
    endpoints: ["127.0.0.1:$UP_PORT"]
routes:
  - name: default
    match: { path_prefix: / }
    upstream: app
    concurrency: { max: 100000 }
shutdown: { drain_delay: 0s, drain_timeout: 1s }
YAML

start_bg upstream "$LOAD_CPU" "$OUT/upstream.log" "$UPSTREAM_BIN" --listen "127.0.0.1:$UP_PORT" --threads 1
wait_http "http://127.0.0.1:$UP_PORT/health" 10 "$LAST_PID" || fail "upstream did not start"
start_bg nginx "$PROXY_CPU" "$OUT/nginx.log" nginx -c "$OUT/nginx.conf" -g 'daemon off;'
start_bg spillway "$PROXY_CPU" "$OUT/spillway.log" "$SPILLWAY_BIN" run --config "$OUT/spillway.yaml"
for port in "$NGINX_PORT" "$SPILLWAY_PORT"; do
    for _ in $(seq 100); do
        curl -sk -o /dev/null --max-time 1 "https://127.0.0.1:$port/health" && break
        sleep 0.1
    done
done

h2() { timeout 60 taskset -c "$LOAD_CPU" h2load "$@" 2>&1; }
rps_of() { awk '/^finished in/ { for (i = 1; i <= NF; i++) if ($i ~ /req\/s/) { gsub(",", "", $(i-1)); print $(i-1) } }'; }
lat_of() { awk '/^time for request:/ { print $4 "/" $6 }'; }

printf '%s\n' "case       target     req/s   lat mean/max  (round)" >"$OUT/results.txt"
for round in $(seq "$ROUNDS"); do
    for target in nginx spillway; do
        port=$NGINX_PORT; [[ $target == spillway ]] && port=$SPILLWAY_PORT
        url="https://127.0.0.1:$port/"
        # handshake: HS_N clients, each opening its own TLS connection for one request.
        hs=$(h2 -n "$HS_N" -c "$HS_N" -m 1 "$url" | tee "$OUT/hs-$target-$round.txt" | rps_of)
        printf 'handshake  %-9s %8s  %s  (%s)\n' "$target" "${hs:-nan}" "$(lat_of <"$OUT/hs-$target-$round.txt")" "$round" >>"$OUT/results.txt"
        mux=$(h2 -D "$MUX_D" -c "$MUX_C" -m "$MUX_M" "$url" | tee "$OUT/mux-$target-$round.txt" | rps_of)
        printf 'h2mux      %-9s %8s  %s  (%s)\n' "$target" "${mux:-nan}" "$(lat_of <"$OUT/mux-$target-$round.txt")" "$round" >>"$OUT/results.txt"
    done
done
cat "$OUT/results.txt"
say "raw h2load output in $OUT"
