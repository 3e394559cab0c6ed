#!/usr/bin/env bash
# Belfry beside the reference server (../shared/tools/limit-server), interleaved
# on the same machine: a fresh server per run, the server pinned to core 0 and
# the generator to core 1 (override with SERVER_CPUS / BENCH_CPUS). Not part of
# the test command; docs/benchmarks.md records its output and the commands.
#
#   LIMIT_SERVER_BIN  the reference server (built with `cargo build --release`
#                     in a copy of ../shared/tools/limit-server)
#   RUNS              runs per figure and server (default 2)
#   SCENARIOS         any of: ramp fanout1 idle spread cluster (default: the
#                     first four). cluster: two Belfry nodes and their
#                     redis-server all on SERVER_CPUS, subscribers split over
#                     both, events PUBLISHed straight into Redis; the
#                     reference runs its plain ramp beside it.
#   RAMP_START, RAMP_FACTOR  the ramp's first rate and step factor (10, 1.5)
#   SERVER_CPUS, BENCH_CPUS  taskset lists (0 and 1; "0-1" for both cores)
#   OUT               directory for the JSON results (default: a temp dir)
#   IDLE_FLAGS        extra flags for the idle scenario (--shared-channel)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
node_bin="${BELFRY_NODE_BIN:-$repo/target/release/belfry-node}"
bench_bin="$repo/target/release/belfry-bench"
limit_bin="${LIMIT_SERVER_BIN:?set LIMIT_SERVER_BIN to the reference server binary}"
runs="${RUNS:-2}"
scenarios="${SCENARIOS:-ramp fanout1 idle spread}"
server_cpus="${SERVER_CPUS:-0}"
bench_cpus="${BENCH_CPUS:-1}"
out="${OUT:-$(mktemp -d)}"
port=6301
metrics_port=6311
redis_port=6321
mkdir -p "$out"

server_pid=
extra_pids=()
stop_server() {
    for pid in $server_pid "${extra_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    server_pid=
    extra_pids=()
}
trap stop_server EXIT

wait_port() {
    for _ in $(seq 1 100); do
        if (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    return 1
}

belfry_env=(BELFRY_MAX_CONNECTIONS_PER_IP=0 BELFRY_CONNECTIONS_PER_IP_PER_MINUTE=0 RUST_LOG=warn
    REVERB_APP_ID=belfry REVERB_APP_KEY=key1 REVERB_APP_SECRET=secret1)

# Two cluster-mode nodes (ports $port and $port+1) over a fresh redis-server,
# all three on the server cores.
start_cluster() {
    taskset -c "$server_cpus" redis-server --port "$redis_port" --save "" --appendonly no \
        >"$out/redis.log" 2>&1 &
    extra_pids+=($!)
    wait_port "$redis_port"
    env "${belfry_env[@]}" BELFRY_PORT=$((port + 1)) BELFRY_METRICS_PORT=0 \
        taskset -c "$server_cpus" "$node_bin" --redis-url "redis://127.0.0.1:$redis_port" \
        >"$out/belfry-2.log" 2>&1 &
    extra_pids+=($!)
    env "${belfry_env[@]}" BELFRY_PORT=$port BELFRY_METRICS_PORT=$metrics_port \
        taskset -c "$server_cpus" "$node_bin" --redis-url "redis://127.0.0.1:$redis_port" \
        >"$out/belfry.log" 2>&1 &
    server_pid=$!
    wait_port "$port" && wait_port $((port + 1))
}

start_server() {
    local which=$1
    case "$which" in
        limit)
            taskset -c "$server_cpus" "$limit_bin" -p "$port" --stats 0 >"$out/$which.log" 2>&1 &
            ;;
        belfry)
            env "${belfry_env[@]}" BELFRY_PORT=$port BELFRY_METRICS_PORT=$metrics_port \
                taskset -c "$server_cpus" "$node_bin" >"$out/$which.log" 2>&1 &
            ;;
    esac
    server_pid=$!
    wait_port "$port" || { cat "$out/$which.log" >&2; return 1; }
}

# The per-shard fan-out counters, which show how many shards worked.
save_shards() {
    curl -s "http://127.0.0.1:$metrics_port/metrics" | grep -E '^belfry_fanout_(deliveries|writes)_total' >"$1" || true
}

bench() {
    taskset -c "$bench_cpus" "$bench_bin" "$@" --ws "ws://127.0.0.1:$port" \
        --app-id belfry --key key1 --secret secret1 --server-pid "$server_pid" --json
}

for run in $(seq 1 "$runs"); do
    for scenario in $scenarios; do
        for server in limit belfry; do
            file="$out/$scenario-$server-$run.json"
            if [[ "$scenario" == cluster && "$server" == belfry ]]; then
                start_cluster
            else
                start_server "$server"
            fi
            ramp_flags=(--clients 10000 --start-rate "${RAMP_START:-10}" --factor "${RAMP_FACTOR:-1.5}" --step-secs 5
                --p99-ms 250 --max-rate 2000)
            case "$scenario" in
                cluster)
                    if [[ "$server" == belfry ]]; then
                        bench ramp "${ramp_flags[@]}" --ws "ws://127.0.0.1:$((port + 1))" \
                            --publish redis --redis-url "redis://127.0.0.1:$redis_port" >"$file"
                    else
                        bench ramp "${ramp_flags[@]}" >"$file"
                    fi ;;
                ramp) bench ramp "${ramp_flags[@]}" >"$file" ;;
                fanout1) bench fanout --clients 10000 --rate 1 --duration 10 >"$file" ;;
                idle) bench idle --clients 19000 ${IDLE_FLAGS:-} >"$file" ;;
                spread) bench spread --clients 10000 --rate 1000 --duration 10 >"$file" ;;
            esac || echo "$scenario on $server, run $run: the generator failed (see $file)" >&2
            [[ "$server" == belfry ]] && save_shards "$out/$scenario-$server-$run.shards"
            stop_server
            echo "$scenario $server run $run -> $file"
        done
    done
done
echo "results in $out"
