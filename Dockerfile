# syntax=docker/dockerfile:1
# The CPU build of Quiver: `quiver worker`, the CPU upstream that gateways overflow to, and
# gateways without a GPU (`quiver serve`). Built without the `cuda` feature, so it needs no
# NVIDIA driver to start (docs/cuda.md); the GPU image is Dockerfile.cuda.
#
#   docker build -t quiver:cpu .
#
#   # A worker serving the embedded default models (identity, mlp): REST 8000, gRPC 8001,
#   # metrics 8002.
#   docker run -p 8000-8002:8000-8002 quiver:cpu
#
#   # A worker with its own configuration and models. Model paths in the file are paths in
#   # the container (/models/...); keep its listeners on 8000-8002 (or pass --http-port 8000
#   # --grpc-port 8001 --metrics-port 8002), which is where the health check looks.
#   docker run -p 8000-8002:8000-8002 \
#     -v "$PWD/models:/models:ro" -v "$PWD/worker.toml:/etc/quiver/quiver.toml:ro" \
#     quiver:cpu worker --config /etc/quiver/quiver.toml
#
#   # A CPU-only gateway (QUIC 4433/udp as well), or any other subcommand:
#   docker run -p 4433:4433/udp -p 8000-8002:8000-8002 -v "$PWD/models:/models:ro" \
#     quiver:cpu serve --model /models/all-MiniLM-L6-v2
#   docker run --rm -v "$PWD/quiver.toml:/etc/quiver/quiver.toml:ro" \
#     quiver:cpu config check /etc/quiver/quiver.toml
#
# Configuration: /etc/quiver/quiver.toml by convention (mount it, pass --config); without
# --config the embedded default is served (`quiver config default` prints it). Logs: stderr,
# filtered by RUST_LOG (default info). Health: GET $QUIVER_HEALTHCHECK_URL
# (http://127.0.0.1:8000/v2/health/ready); override it with -e when REST listens elsewhere.
# Health endpoints need no token unless server.auth_exempt_health = false, which this check
# cannot satisfy.

# Builder and runtime share one Debian release, so the binary finds the glibc it was linked
# against. Pin further with a digest if you need byte-for-byte reproducible bases.
ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm

# ---- build: the release binary, CPU only -----------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
# Sources only (.dockerignore); the registry and target/ live in BuildKit cache mounts, so a
# rebuild compiles only what changed. --locked: Cargo.lock is the truth, never updated here.
# No `cuda` feature; the ldd check fails the build if libcuda is linked all the same.
COPY . .
RUN --mount=type=cache,id=quiver-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=quiver-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=quiver-target-cpu,target=/src/target,sharing=locked \
    cargo build --release --locked -p quiver-gateway --bin quiver \
 && install -D -m 0755 target/release/quiver /out/quiver \
 && ! ldd /out/quiver | grep -F libcuda

# ---- runtime: the binary, curl for the health check, an unprivileged user -------------
# No ca-certificates: nothing in quiver trusts the system's roots (upstreams are h2c or gRPC
# in the clear; QUIC clients trust --ca or --pin). Add it if that changes.
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
LABEL org.opencontainers.image.title="quiver" \
      org.opencontainers.image.description="Quiver inference edge gateway, CPU build (quiver worker / serve)" \
      org.opencontainers.image.licenses="Apache-2.0"
# DL3008 (pin apt package versions) is ignored on purpose: the pin is the base image
# (DEBIAN_RELEASE, or a digest). Debian keeps only the current version of a package in the
# archive, so an exact `curl=<version>` stops resolving at the next security update and
# breaks the build while buying nothing the base pin does not already give.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 quiver \
 && useradd --system --uid 10001 --gid quiver --home-dir /var/lib/quiver --create-home \
      --shell /usr/sbin/nologin quiver \
 && install -d -m 0755 /models /etc/quiver
COPY --from=build /out/quiver /usr/local/bin/quiver
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /var/lib/quiver
ENV QUIVER_HEALTHCHECK_URL=http://127.0.0.1:8000/v2/health/ready
# QUIC native and HTTP/3 (serve only), REST (KServe v2), gRPC, Prometheus metrics.
EXPOSE 4433/udp 8000 8001 8002
# Model directories (Hugging Face layout), mounted read-only.
VOLUME ["/models"]
# start-period: the latency model's calibration sweep runs before the server is ready.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["/bin/sh", "-c", "curl -fsS --max-time 2 \"$QUIVER_HEALTHCHECK_URL\" || exit 1"]
# SIGTERM drains: readiness turns false, requests in flight get server.shutdown_grace_ms
# (default 10 s). Docker kills after 10 s by default: give `docker stop -t 15` or
# `docker run --stop-timeout 15` (Kubernetes: terminationGracePeriodSeconds, 30 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["quiver"]
CMD ["worker"]
