#!/usr/bin/env bash
# Checks docs/openapi.yaml against a running belfry-node with schemathesis
# (pinned in requirements.txt, installed into a venv made here): positive
# cases are signed by signing.py, negative ones probe the checks. Fails on
# any 5xx or any response outside the spec. About a minute.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
NODE_BIN="${BELFRY_NODE_BIN:-$REPO/target/release/belfry-node}"
VENV="${BELFRY_API_VENV:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/belfry-api-venv}"

if [ ! -x "$VENV/bin/schemathesis" ] || ! "$VENV/bin/pip" freeze 2>/dev/null | grep -qxF "$(cat "$HERE/requirements.txt")"; then
  python3 -m venv "$VENV" || { echo "api: cannot make a venv (apt-get install python3-venv)"; exit 1; }
  "$VENV/bin/pip" install -q -r "$HERE/requirements.txt" || { echo "api: cannot install schemathesis from PyPI"; exit 1; }
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
METRICS=$(free_port)
DIR=$(mktemp -d)
export BELFRY_API_KEY=api-key BELFRY_API_SECRET=api-secret
cat > "$DIR/belfry.toml" <<TOML
host = "127.0.0.1"
port = $PORT
metrics_port = $METRICS
max_connections_per_ip = 0
connections_per_ip_per_minute = 0
[[apps]]
id = "api-app"
key = "$BELFRY_API_KEY"
secret = "$BELFRY_API_SECRET"
TOML
"$NODE_BIN" --config "$DIR/belfry.toml" > "$DIR/node.log" 2>&1 &
NODE_PID=$!
trap 'kill $NODE_PID 2>/dev/null; wait $NODE_PID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/up" >/dev/null && break; sleep 0.1; done

status=0
SCHEMATHESIS_HOOKS=signing PYTHONPATH="$HERE" "$VENV/bin/schemathesis" run "$REPO/docs/openapi.yaml" \
  --url "http://127.0.0.1:$PORT" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples "${BELFRY_API_EXAMPLES:-40}" --phases examples,coverage,fuzzing \
  --generation-deterministic --request-timeout 5 --workers 1 \
  --suppress-health-check all || status=$?

# The signing must have worked: signed requests reached the routes and were answered 200.
curl -fs "http://127.0.0.1:$METRICS/metrics" | { grep '^belfry_http_requests_total' || true; } > "$DIR/requests.txt"
ok=$(grep 'status="200"' "$DIR/requests.txt" | grep -v 'route="unknown"' | awk '{s+=$2} END {print s+0}' || true)
echo "api: requests by route and status:"; sed 's/^belfry_http_requests_total/  /' "$DIR/requests.txt" | sort
echo "api: signed API requests answered 200: $ok"
if [ "${ok%.*}" -lt 1 ]; then echo "api: no signed request was accepted: the hook's signing is wrong"; status=1; fi
if grep -q "panicked" "$DIR/node.log"; then echo "api: the node panicked"; grep -A5 panicked "$DIR/node.log"; status=1; fi
exit $status
