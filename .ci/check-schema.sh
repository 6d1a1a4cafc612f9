#!/usr/bin/env bash
# Validates the configs spillway ships against the JSON Schema `spillway schema` prints, with
# an independent validator (check-jsonschema, from PyPI): config/*.yaml, and the spillway.yaml
# inside the Kubernetes ConfigMap (deploy/kubernetes/base/configmap.yaml). Before that the
# schema itself is checked against the draft 2020-12 metaschema (its patterns included); after
# it, a config with an unknown key must be refused, so a schema that lets anything through
# cannot pass.
#
# ${VAR} references: the schema describes a config as spillway reads it, after expansion, so
# each file is expanded first by spillway's rules (docs/configuration.md#environment-variables):
# ${VAR:-default} becomes its default, the value the file has when nothing is set (this check
# ignores the environment there, so that it checks the same file on every machine); ${VAR}
# becomes the value of VAR in this script's environment, and an unset one fails the check
# (give it a default in the file, or set VAR for the check): no made-up value would suit every
# key. $${ is a literal ${, and whole-line comments are left as they are.
#
# Installs check-jsonschema (pip) and PyYAML when missing. SPILLWAY_BIN skips the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=SCRIPTDIR/../scripts/lib.sh
source scripts/lib.sh
need_pip_tool check-jsonschema
python3 -c 'import yaml' 2>/dev/null || pip_install pyyaml
echo "check-jsonschema $(check-jsonschema --version | awk '{print $NF}')"

bin=${SPILLWAY_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release -q --bin spillway
  bin=target/release/spillway
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
schema=$work/spillway.schema.json
"$bin" schema > "$schema"
check-jsonschema --check-metaschema "$schema"

# Each config as spillway would read it, one file each under $work/configs.
mkdir "$work/configs"
python3 - "$work/configs" config/*.yaml deploy/kubernetes/base/configmap.yaml <<'PY'
import os
import re
import sys

import yaml

out_dir, sources = sys.argv[1], sys.argv[2:]
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
failed = []


def expand(text, origin):
    """spillway's ${VAR} expansion (src/config/env.rs), defaults taken as given."""
    lines = []
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        if line.lstrip().startswith("#"):
            lines.append(line)
            continue
        out, i = [], 0
        while (j := line.find("$", i)) >= 0:
            out.append(line[i:j])
            rest = line[j:]
            if rest.startswith("$${"):
                out.append("${")
                i = j + 3
            elif rest.startswith("${"):
                end = rest.find("}")
                if end < 0:
                    failed.append(f"{origin}:{number}: unterminated ${{")
                    break
                body = rest[2:end]
                name, has_default, default = body.partition(":-")
                if not NAME.fullmatch(name):
                    failed.append(f"{origin}:{number}: ${{{body}}} is not a valid reference")
                elif has_default:
                    out.append(default)
                elif name in os.environ:
                    out.append(os.environ[name])
                else:
                    failed.append(
                        f"{origin}:{number}: ${{{name}}} has no default and {name} is not set: "
                        f"give it one (${{{name}:-value}}) or set {name} for this check"
                    )
                i = j + end + 1
            else:
                out.append("$")
                i = j + 1
        else:
            out.append(line[i:])
        lines.append("".join(out))
    return "".join(lines)


def write(name, text, origin):
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        f.write(expand(text, origin))
    print(f"  {origin} -> {name}")


for source in sources:
    with open(source) as f:
        text = f.read()
    base = os.path.splitext(os.path.basename(source))[0]
    if "kind: ConfigMap" not in text:
        write(f"{base}.yaml", text, source)
        continue
    configs = 0
    for doc in yaml.safe_load_all(text):
        if not doc or doc.get("kind") != "ConfigMap":
            continue
        for key, value in (doc.get("data") or {}).items():
            if key.endswith((".yaml", ".yml")):
                write(f"{base}-{key}", value, f"{source} data.{key}")
                configs += 1
    if not configs:
        failed.append(f"{source}: no ConfigMap with a YAML file in its data")

if failed:
    print("\n".join(failed), file=sys.stderr)
    sys.exit(1)
PY
check-jsonschema --schemafile "$schema" "$work"/configs/*.yaml

# The negative control: an unknown key (a typo of `timeout`) must fail validation.
printf '%s\n' 'listeners: [{ address: 127.0.0.1:8080 }]' \
  'upstreams: { app: { endpoints: ["127.0.0.1:3000"] } }' \
  'routes: [{ name: r, upstream: app, timout: 5s }]' > "$work/unknown-key.yaml"
if check-jsonschema --schemafile "$schema" "$work/unknown-key.yaml" > "$work/refused.txt" 2>&1; then
  echo "check-schema: a config with an unknown key passed validation"
  exit 1
fi
if ! grep -q timout "$work/refused.txt"; then
  cat "$work/refused.txt"
  echo "check-schema: the unknown key was refused, but not by name"
  exit 1
fi
echo "check-schema: $(find "$work/configs" -name '*.yaml' | wc -l) configs valid; an unknown key is refused"
