#!/usr/bin/env bash
# Runs the JavaScript end-to-end suite against target/release/belfry-node (or $BELFRY_NODE_BIN).
# Installs the pinned dev dependencies on first use. Exit code is the test runner's.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
exec npm test --silent
