#!/usr/bin/env python3
"""What the rendered Kubernetes manifests promise, beyond schema validity.

Usage: check-kubernetes.py SPILLWAY_BIN native.yaml classic.yaml

For each form (native sidecar, classic second container):
  - spillway's place: a restartable init container (native) or a regular container (classic);
  - the ConfigMap's config passes `spillway check` with the pod's environment (POD_NAME from
    the downward API, the drain delay the form sets), listens on the ports the container
    declares, forwards to the app container's port, keeps the full admin on loopback (and
    undeclared) and serves metrics and probes on all interfaces (admin.metrics_address);
  - probes: liveness /healthz and readiness /readyz on the metrics port; readiness tolerates
    one slow answer (failureThreshold >= 2, timeoutSeconds >= 2);
  - a config error at start reaches `kubectl describe` (FallbackToLogsOnError), as JSON;
  - the config volume is mounted as a directory (a subPath mount never sees ConfigMap updates);
  - the Service targets spillway's proxy port; the PodMonitor and the prometheus.io annotations
    point at the metrics port of these pods;
  - securityContext: non-root, read-only root, no privilege escalation, ALL capabilities
    dropped, seccomp RuntimeDefault; resource requests and limits set;
  - the shutdown arithmetic: terminationGracePeriodSeconds covers the whole stop sequence of the
    form, and the app's preStop sleep fits the form (see deploy/kubernetes/*/ comments).
"""

import os
import re
import subprocess
import sys

import yaml

# The longest the example app takes to finish its in-flight requests after SIGTERM, and the
# least slack the grace period keeps on top (deploy/kubernetes comments use the same numbers).
APP_DRAIN_S = 30
MARGIN_S = 10

errors = []


def check(cond, msg):
    if cond:
        print(f"  ok: {msg}")
    else:
        print(f"  FAIL: {msg}")
        errors.append(msg)


def seconds(text):
    """humantime-style durations as spillway prints them: 0s, 5s, 250ms, 2m, 1m 30s."""
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def sleep_seconds(container):
    pre = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    cmd = (pre.get("exec") or {}).get("command") or []
    if len(cmd) == 2 and cmd[0] == "sleep":
        return float(cmd[1])
    return 0.0


def port_number(container, name_or_number):
    if isinstance(name_or_number, int):
        return name_or_number
    for p in container.get("ports", []):
        if p.get("name") == name_or_number:
            return p["containerPort"]
    return None


def check_form(form, path, spillway_bin):
    print(f"{form} ({path})")
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deploy = by_kind["Deployment"][0]
    pod = deploy["spec"]["template"]
    spec = pod["spec"]
    init = spec.get("initContainers") or []
    containers = spec.get("containers") or []

    if form == "native":
        sp = next((c for c in init if c["name"] == "spillway"), None)
        check(sp is not None and sp.get("restartPolicy") == "Always",
              "spillway is an init container with restartPolicy: Always (native sidecar)")
    else:
        sp = next((c for c in containers if c["name"] == "spillway"), None)
        check(sp is not None and "restartPolicy" not in sp and not init,
              "spillway is a regular container, no init containers")
    if sp is None:
        return
    apps = [c for c in containers if c["name"] != "spillway"]
    check(len(apps) == 1, "one app container beside spillway")
    app = apps[0]

    env = {e["name"]: e for e in sp.get("env", [])}
    pod_name = env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    check(pod_name == "metadata.name", "POD_NAME comes from the downward API (metadata.name)")

    # The config, checked by spillway itself with the environment the container gets.
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = [m for m in sp.get("volumeMounts", []) if m["mountPath"] == "/etc/spillway"]
    check(len(mounts) == 1 and "subPath" not in mounts[0] and mounts[0].get("readOnly") is True,
          "config mounted read-only as a directory at /etc/spillway (no subPath: updates arrive)")
    cm_name = volumes[mounts[0]["name"]]["configMap"]["name"] if mounts else None
    cm = next((c for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"] == cm_name), None)
    check(cm is not None and "spillway.yaml" in cm["data"], f"ConfigMap {cm_name} holds spillway.yaml")
    args = sp.get("args", [])
    check(args == ["--log-format", "json", "--config", "/etc/spillway/spillway.yaml"],
          "spillway runs with --log-format json --config /etc/spillway/spillway.yaml")
    check(sp.get("terminationMessagePolicy") == "FallbackToLogsOnError",
          "terminationMessagePolicy: FallbackToLogsOnError (a start-up error shows in kubectl describe)")
    config_text = cm["data"]["spillway.yaml"]
    check("${POD_NAME" in config_text, "server_id comes from ${POD_NAME}")
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("SPILLWAY_")}
    run_env["POD_NAME"] = "app-7d4b9c-x2x9z"
    for name, e in env.items():
        if "value" in e:
            run_env[name] = e["value"]
    cfg_path = f"/tmp/spillway-{form}-{os.getpid()}.yaml"
    with open(cfg_path, "w") as f:
        f.write(config_text)
    out = subprocess.run([spillway_bin, "check", "--config", cfg_path], env=run_env,
                         capture_output=True, text=True)
    os.unlink(cfg_path)
    check(out.returncode == 0, "spillway check accepts the ConfigMap's config" +
          ("" if out.returncode == 0 else ":\n" + out.stderr))
    if out.returncode != 0:
        return
    summary = out.stdout
    check(re.search(r"^server_id\s+app-7d4b9c-x2x9z$", summary, re.M) is not None, "server_id is the pod name")
    m = re.search(r"^shutdown\s+drain_delay (.+?), drain_timeout (.+)$", summary, re.M)
    check(m is not None, "`spillway check` prints the shutdown timings")
    if m is None:
        return
    drain_delay, drain_timeout = seconds(m.group(1)), seconds(m.group(2))
    print(f"    drain_delay {drain_delay:g}s, drain_timeout {drain_timeout:g}s")
    cfg = yaml.safe_load(config_text)
    listen_port = int(cfg["listeners"][0]["address"].rsplit(":", 1)[1])
    admin_host, admin_port = cfg["admin"]["address"].rsplit(":", 1)
    admin_port = int(admin_port)
    metrics_host, metrics_port = cfg["admin"].get("metrics_address", ":0").rsplit(":", 1)
    metrics_port = int(metrics_port)
    upstream_port = int(next(iter(cfg["upstreams"].values()))["endpoints"][0].rsplit(":", 1)[1])
    check(cfg["listeners"][0]["address"].startswith("0.0.0.0:"), "proxy listener on all interfaces")
    check(admin_host == "127.0.0.1", "full admin (/config, /reload, status page) on loopback only")
    check(metrics_host == "0.0.0.0", "metrics listener on all interfaces (kubelet probes, Prometheus)")
    check(port_number(sp, "http") == listen_port, f"container port http = listener port {listen_port}")
    check(port_number(sp, "metrics") == metrics_port, f"container port metrics = metrics port {metrics_port}")
    declared = [p["containerPort"] for p in sp.get("ports", [])]
    check(admin_port not in declared, f"the admin port {admin_port} is not declared")
    app_ports = [p["containerPort"] for p in app.get("ports", [])]
    check(upstream_port in app_ports, f"upstream 127.0.0.1:{upstream_port} is the app container's port")

    live = (sp.get("livenessProbe") or {}).get("httpGet") or {}
    ready_probe = sp.get("readinessProbe") or {}
    ready = ready_probe.get("httpGet") or {}
    check(live.get("path") == "/healthz" and port_number(sp, live.get("port")) == metrics_port,
          "liveness: /healthz on the metrics port")
    check(ready.get("path") == "/readyz" and port_number(sp, ready.get("port")) == metrics_port,
          "readiness: /readyz on the metrics port")
    check(ready_probe.get("failureThreshold", 3) >= 2 and ready_probe.get("timeoutSeconds", 1) >= 2,
          "readiness tolerates one slow answer (failureThreshold >= 2, timeoutSeconds >= 2)")
    if form == "native":
        start = (sp.get("startupProbe") or {}).get("httpGet") or {}
        check(start.get("path") == "/healthz", "startupProbe: the app starts once spillway is up")

    svc = by_kind["Service"][0]
    check(svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), "Service selects these pods")
    check(all(port_number(sp, p["targetPort"]) == listen_port for p in svc["spec"]["ports"]),
          "Service targets spillway's proxy port only")
    ann = pod["metadata"].get("annotations", {})
    check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(metrics_port)
          and ann.get("prometheus.io/path") == "/metrics", "prometheus.io annotations point at the metrics port")
    pm = (by_kind.get("PodMonitor") or [None])[0]
    check(pm is not None, "a PodMonitor (schema not validated: CRD kind)")
    if pm:
        sel = pm["spec"]["selector"]["matchLabels"]
        eps = pm["spec"]["podMetricsEndpoints"]
        check(sel.items() <= pod["metadata"]["labels"].items(), "PodMonitor selects these pods")
        check(all(port_number(sp, e["port"]) == metrics_port and e.get("path", "/metrics") == "/metrics" for e in eps),
              "PodMonitor scrapes the metrics port's /metrics")

    pod_sc = spec.get("securityContext", {})
    for c in [sp, app]:
        sc = {**pod_sc, **c.get("securityContext", {})}
        check(sc.get("runAsNonRoot") is True and sc.get("readOnlyRootFilesystem") is True
              and sc.get("allowPrivilegeEscalation") is False
              and sc.get("capabilities", {}).get("drop") == ["ALL"]
              and sc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
              f"{c['name']}: non-root, read-only root, no escalation, drop ALL, seccomp RuntimeDefault")
    res = sp.get("resources", {})
    check({"cpu", "memory"} <= res.get("requests", {}).keys() and "memory" in res.get("limits", {}),
          "spillway has CPU/memory requests and a memory limit")

    # Shutdown arithmetic (see the timelines in deploy/kubernetes/base/deployment.yaml and
    # deploy/kubernetes/classic/kustomization.yaml).
    grace = spec.get("terminationGracePeriodSeconds", 30)
    app_sleep = sleep_seconds(app)
    check(sleep_seconds(sp) == 0, "no preStop on spillway: it drains by itself")
    if form == "native":
        # The app stops first (spillway is stopped only after it exited): its preStop covers the
        # endpoint propagation; spillway's drain_delay would only serve an app that is gone.
        check(app_sleep >= 5, f"app preStop sleep {app_sleep:g}s covers endpoint propagation (>= 5s)")
        check(drain_delay == 0, "drain_delay is 0s: the app has exited when spillway is signalled")
        need = app_sleep + APP_DRAIN_S + drain_delay + drain_timeout + MARGIN_S
        check(grace >= need, f"grace {grace}s >= app preStop {app_sleep:g} + app drain {APP_DRAIN_S} + "
              f"drain_delay {drain_delay:g} + drain_timeout {drain_timeout:g} + margin {MARGIN_S} = {need:g}s")
    else:
        # Both are signalled at once: spillway serves for drain_delay, so the app must still be
        # accepting until then.
        check(drain_delay >= 5, f"drain_delay {drain_delay:g}s covers endpoint propagation (>= 5s)")
        check(app_sleep > drain_delay, f"app preStop sleep {app_sleep:g}s > drain_delay {drain_delay:g}s: "
              "the app accepts for as long as spillway forwards new requests")
        need = max(drain_delay + drain_timeout, app_sleep + APP_DRAIN_S) + MARGIN_S
        check(grace >= need, f"grace {grace}s >= max(drain_delay {drain_delay:g} + drain_timeout "
              f"{drain_timeout:g}, app preStop {app_sleep:g} + app drain {APP_DRAIN_S}) + margin {MARGIN_S} = {need:g}s")


def main():
    spillway_bin, native, classic = sys.argv[1:4]
    check_form("native", native, spillway_bin)
    check_form("classic", classic, spillway_bin)
    if errors:
        print(f"kubernetes manifests: {len(errors)} problem(s)")
        sys.exit(1)
    print("kubernetes manifests: clean")


if __name__ == "__main__":
    main()
