# syntax=docker/dockerfile:1
#
# spillway as a container image: a profile-guided release build (scripts/pgo-build.sh) on the
# official Rust image (Debian bookworm), copied onto distroless/cc-debian12 (bookworm's glibc
# and libgcc, CA certificates, no shell, no package manager), running as the distroless
# `nonroot` user (65532).
#
#   docker build -t spillway:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9902:9902 \
#     -v "$PWD/spillway.yaml:/etc/spillway/spillway.yaml:ro" spillway:0.1.0
#
# The config is read from /etc/spillway/spillway.yaml (SPILLWAY_CONFIG; or pass --config) and
# must listen on 0.0.0.0 (proxy 8080, admin.metrics_address 9902) to be reachable from outside
# the container; keep admin.address on 127.0.0.1.
# .ci/check-dockerfile.sh checks this file statically (hadolint and the properties above).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Small and self-contained binary: symbols stripped, no debug info (the image is for running,
# not for debugging; build locally for backtraces with line numbers).
ENV CARGO_PROFILE_DIST_STRIP=symbols \
    CARGO_PROFILE_DIST_DEBUG=false \
    CARGO_TERM_COLOR=never
# The shipped binary is profile-guided (scripts/pgo-build.sh): built instrumented, trained on
# loopback against the built-in sample app, built again with the profile. What the training
# needs stays in this stage. Unpinned: the stage is thrown away, only the binary is kept.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wrk curl openssl \
    && rm -rf /var/lib/apt/lists/* \
    && rustup component add llvm-tools
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
COPY scripts/lib.sh scripts/pgo-build.sh ./scripts/
# The registry and target caches persist across builds (BuildKit); the binary is copied out of
# the cache mount so the next stage can see it. The script runs `cargo build --locked` with
# the `dist` profile (release with fat LTO).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    bash scripts/pgo-build.sh \
    && install -D -m 0755 target/pgo/spillway /out/spillway

FROM gcr.io/distroless/cc-debian12:nonroot
# OCI image annotations (the image-spec's pre-defined keys): registries, scanners and `docker inspect` read these. The build passes what only it knows:
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" -t spillway:0.1.0 .
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="spillway" \
      org.opencontainers.image.description="A reverse-proxy sidecar that observes and sheds load" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build /out/spillway /spillway
ENV SPILLWAY_CONFIG=/etc/spillway/spillway.yaml \
    RUST_LOG=info
USER 65532:65532
# Proxy listener, and the metrics listener (admin.metrics_address: /metrics, /healthz, /readyz).
# The full admin endpoint (status page, /config, /reload) belongs on loopback, not exposed.
EXPOSE 8080 9902
STOPSIGNAL SIGTERM
ENTRYPOINT ["/spillway", "run"]
