#!/usr/bin/env bash
# Smoke test of the load generator against a real belfry-node: builds both
# (release), then
#   1. starts a node on free loopback ports and runs a 3-second fan-out
#      (50 clients, 20 events/s, published through the HTTP API);
#   2. runs `belfry-bench micro --quick` (the in-process micro-benchmarks);
#   3. if redis-server is installed, starts one on a free port and a node in
#      cluster mode on it, and runs a 2-second fan-out published straight
#      into Redis (`--publish redis`).
# Fails if any delivery is lost or duplicated, nothing is delivered, a client
# cannot subscribe, or a step errors. About 15 s after the build.
#
#   BELFRY_NODE_BIN   node binary (default: <repo>/target/release/belfry-node;
#                     when set, the node is not built here)
#   REDIS_SERVER      redis-server binary (default: from PATH; step 3 is
#                     skipped with a note when there is none)
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
redis_bin="${REDIS_SERVER:-$(command -v redis-server || true)}"

pids=()
logs=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -f "${logs[@]}"
}
trap cleanup EXIT

# start_node PORT LOG [ENV...]: starts a node, appends its pid to pids and
# sets node_pid.
start_node() {
    local port="$1" log="$2"
    shift 2
    # The load generator opens every client from 127.0.0.1: lift the
    # per-address limits, which are meant for real clients.
    env -u BELFRY_CONFIG -u BELFRY_PATH_PREFIX -u BELFRY_REDIS_URL BELFRY_PORT="$port" \
        BELFRY_HOST=127.0.0.1 BELFRY_METRICS_PORT=0 BELFRY_MAX_CONNECTIONS_PER_IP=0 \
        BELFRY_CONNECTIONS_PER_IP_PER_MINUTE=0 "$@" "$node_bin" >"$log" 2>&1 &
    node_pid=$!
    pids+=("$node_pid")
}

# wait_ready PID PORT PATH LOG: waits until the node answers 200 on PATH.
wait_ready() {
    local pid="$1" port="$2" path="$3" log="$4"
    for _ in $(seq 40); do
        if ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        if "$bench_bin" wait-ready --http "http://127.0.0.1:$port" --path "$path" \
            --timeout 0.5 2>/dev/null; then
            return 0
        fi
    done
    echo "belfry-node did not become ready ($path); its log:" >&2
    cat "$log" >&2
    exit 1
}

# 1. Fan-out through the HTTP API.
port="$("$bench_bin" free-port)"
log="$(mktemp)"
logs+=("$log")
start_node "$port" "$log"
wait_ready "$node_pid" "$port" /up "$log"
status=0
timeout 50 "$bench_bin" fanout \
    --ws "ws://127.0.0.1:$port" \
    --clients 50 --rate 20 --duration 3 --drain-secs 5 \
    --server-pid "$node_pid" --check || status=$?
if [[ $status -ne 0 ]]; then
    echo "bench smoke FAILED: HTTP fan-out (exit $status); node log:" >&2
    tail -50 "$log" >&2
    exit 1
fi

# 2. Micro-benchmarks, short.
status=0
timeout 20 "$bench_bin" micro --quick || status=$?
if [[ $status -ne 0 ]]; then
    echo "bench smoke FAILED: micro --quick (exit $status)" >&2
    exit 1
fi

# 3. Fan-out published straight into Redis, to a node in cluster mode.
if [[ -z "$redis_bin" ]]; then
    echo "bench smoke: redis-server not found, skipping the --publish redis step"
    echo "bench smoke passed"
    exit 0
fi
redis_port="$("$bench_bin" free-port)"
redis_log="$(mktemp)"
logs+=("$redis_log")
"$redis_bin" --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    >"$redis_log" 2>&1 &
pids+=("$!")
redis_url="redis://127.0.0.1:$redis_port"
port="$("$bench_bin" free-port)"
log="$(mktemp)"
logs+=("$log")
start_node "$port" "$log" BELFRY_REDIS_URL="$redis_url"
wait_ready "$node_pid" "$port" /readyz "$log"
status=0
timeout 50 "$bench_bin" fanout \
    --ws "ws://127.0.0.1:$port" --publish redis --redis-url "$redis_url" \
    --clients 50 --rate 20 --duration 2 --drain-secs 5 \
    --server-pid "$node_pid" --check || status=$?
if [[ $status -ne 0 ]]; then
    echo "bench smoke FAILED: --publish redis fan-out (exit $status); node log:" >&2
    tail -50 "$log" >&2
    echo "redis log:" >&2
    tail -20 "$redis_log" >&2
    exit 1
fi
echo "bench smoke passed"
