# syntax=docker/dockerfile:1.7
# Belfry image: belfry-node (default) and belfry-coordinator in one small runtime image.
#   docker build -t belfry:dev .
#   docker run --rm -p 8080:8080 -p 9601:9601 belfry:dev
#   docker run --rm belfry:dev belfry-coordinator --redis-url redis://redis:6379
# Needs BuildKit (default in current Docker) for the cache mounts.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

############################ build ############################
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src

# Dependencies first: this layer only changes when a manifest or the lock file does.
COPY Cargo.toml Cargo.lock ./
COPY node/Cargo.toml node/Cargo.toml
COPY coordinator/Cargo.toml coordinator/Cargo.toml
COPY benches/Cargo.toml benches/Cargo.toml
# Cargo refuses a manifest without targets, so give each member an empty stub until the sources arrive.
RUN mkdir -p node/src coordinator/src benches/src \
 && touch node/src/main.rs coordinator/src/lib.rs benches/src/main.rs
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    cargo fetch --locked

# Then the sources. The registry and target/ are cache mounts, so unchanged dependencies are not rebuilt;
# the binaries are copied out of the cache mount in the same step.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin belfry-node --bin belfry-coordinator \
 && mkdir -p /out \
 && cp target/release/belfry-node target/release/belfry-coordinator /out/ \
 && strip --strip-debug /out/belfry-node /out/belfry-coordinator

############################ runtime ############################
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 belfry \
 && useradd --system --uid 10001 --gid belfry --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin belfry \
 && mkdir -p /etc/belfry

COPY --from=build /out/belfry-node /usr/local/bin/belfry-node
COPY --from=build /out/belfry-coordinator /usr/local/bin/belfry-coordinator

# Listen on every interface inside the container (the binary's default is 127.0.0.1).
ENV BELFRY_HOST=0.0.0.0 \
    BELFRY_LOG_FORMAT=json \
    RUST_LOG=info

# 8080: WebSocket + HTTP API; 9601: node /metrics, /healthz, /readyz; 9602: coordinator /metrics.
EXPOSE 8080 9601 9602
USER 10001:10001
STOPSIGNAL SIGTERM
CMD ["belfry-node"]
