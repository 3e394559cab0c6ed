#!/usr/bin/env bash
# Belfry beside the reference server (../shared/tools/limit-server), interleaved
# on the same machine: a fresh server per run, the server pinned to core 0 and
# the generator to core 1 (override with SERVER_CPUS / BENCH_CPUS). Not part of
# the test command; docs/benchmarks.md records its output and the commands.
#
#   LIMIT_SERVER_BIN  the reference server (built with `cargo build --release`
#                     in a copy of ../shared/tools/limit-server)
#   RUNS              runs per figure and server (default 2)
#   SCENARIOS         any of: ramp fanout1 idle spread (default: all)
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
mkdir -p "$out"

server_pid=
stop_server() {
    if [[ -n "$server_pid" ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
}
trap stop_server EXIT

start_server() {
    local which=$1
    case "$which" in
        limit)
            taskset -c "$server_cpus" "$limit_bin" -p "$port" --stats 0 >"$out/$which.log" 2>&1 &
            ;;
        belfry)
            BELFRY_PORT=$port BELFRY_METRICS_PORT=0 BELFRY_MAX_CONNECTIONS_PER_IP=0 \
                BELFRY_CONNECTIONS_PER_IP_PER_MINUTE=0 RUST_LOG=warn \
                REVERB_APP_ID=belfry REVERB_APP_KEY=key1 REVERB_APP_SECRET=secret1 \
                taskset -c "$server_cpus" "$node_bin" >"$out/$which.log" 2>&1 &
            ;;
    esac
    server_pid=$!
    for _ in $(seq 1 100); do
        if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "server $which did not start" >&2
    cat "$out/$which.log" >&2
    return 1
}

bench() {
    taskset -c "$bench_cpus" "$bench_bin" "$@" --ws "ws://127.0.0.1:$port" \
        --app-id belfry --key key1 --secret secret1 --server-pid "$server_pid" --json
}

for run in $(seq 1 "$runs"); do
    for scenario in $scenarios; do
        for server in limit belfry; do
            start_server "$server"
            file="$out/$scenario-$server-$run.json"
            case "$scenario" in
                ramp) bench ramp --clients 10000 --start-rate "${RAMP_START:-10}" --factor "${RAMP_FACTOR:-1.5}" --step-secs 5 \
                    --p99-ms 250 --max-rate 2000 >"$file" ;;
                fanout1) bench fanout --clients 10000 --rate 1 --duration 10 >"$file" ;;
                idle) bench idle --clients 19000 ${IDLE_FLAGS:-} >"$file" ;;
                spread) bench spread --clients 10000 --rate 1000 --duration 10 >"$file" ;;
            esac || echo "$scenario on $server, run $run: the generator failed (see $file)" >&2
            stop_server
            echo "$scenario $server run $run -> $file"
        done
    done
done
echo "results in $out"
