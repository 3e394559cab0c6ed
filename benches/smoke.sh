#!/usr/bin/env bash
# Smoke test of the load generator against a real belfry-node: builds both
# (release), starts the node on free loopback ports, runs a 3-second fan-out
# (50 clients, 20 events/s) and fails if any delivery is lost or duplicated,
# nothing is delivered, or a client cannot subscribe. Takes a few seconds
# after the build.
#
#   BELFRY_NODE_BIN   node binary (default: <repo>/target/release/belfry-node;
#                     when set, the node is not built here)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if [[ -n "${BELFRY_NODE_BIN:-}" ]]; then
    cargo build --release -p belfry-bench
    node_bin="$BELFRY_NODE_BIN"
else
    cargo build --release -p belfry-node -p belfry-bench
    node_bin="$repo/target/release/belfry-node"
fi
bench_bin="$repo/target/release/belfry-bench"

port="$("$bench_bin" free-port)"
log="$(mktemp)"
env -u BELFRY_CONFIG -u BELFRY_PATH_PREFIX BELFRY_PORT="$port" BELFRY_HOST=127.0.0.1 \
    BELFRY_METRICS_PORT=0 "$node_bin" >"$log" 2>&1 &
node_pid=$!
cleanup() {
    kill "$node_pid" 2>/dev/null || true
    wait "$node_pid" 2>/dev/null || true
    rm -f "$log"
}
trap cleanup EXIT

ready=0
for _ in $(seq 40); do
    if ! kill -0 "$node_pid" 2>/dev/null; then
        break
    fi
    if "$bench_bin" wait-ready --http "http://127.0.0.1:$port" --timeout 0.5 2>/dev/null; then
        ready=1
        break
    fi
done
if [[ $ready -ne 1 ]]; then
    echo "belfry-node did not become ready; its log:" >&2
    cat "$log" >&2
    exit 1
fi

status=0
timeout 50 "$bench_bin" fanout \
    --ws "ws://127.0.0.1:$port" \
    --clients 50 --rate 20 --duration 3 --drain-secs 5 \
    --server-pid "$node_pid" --check || status=$?

if [[ $status -ne 0 ]]; then
    echo "bench smoke FAILED (exit $status); node log:" >&2
    tail -50 "$log" >&2
    exit 1
fi
echo "bench smoke passed"
