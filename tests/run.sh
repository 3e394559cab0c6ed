#!/usr/bin/env bash
# The test command: everything CI runs, on a fresh machine of this kind.
# Installs what it needs (redis-server, the JS clients from the lockfile),
# builds once in release mode, then runs lint, Rust tests, the end-to-end
# suites against the real binaries, the load generator's smoke run and the
# deployment checks. Exits non-zero if any of them fails.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }
failed=()
run() {
  local name=$1; shift
  step "$name"
  if "$@"; then echo "ok: $name"; else echo "FAILED: $name"; failed+=("$name"); fi
}

step "installing what the tests need"
if ! command -v redis-server >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null || { echo "cannot install redis-server"; exit 1; }
fi
if ! command -v node >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq nodejs npm) >/dev/null || { echo "cannot install node"; exit 1; }
fi
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error) || { echo "npm ci failed"; exit 1; }

step "building (release)"
cargo build --release --workspace --bins --locked || exit 1
export BELFRY_NODE_BIN="$root/target/release/belfry-node"
export BELFRY_COORDINATOR_BIN="$root/target/release/belfry-coordinator"
export BELFRY_BENCH_BIN="$root/target/release/belfry-bench"

run "cargo fmt --check" cargo fmt --all -- --check
run "cargo clippy" cargo clippy --release --workspace --all-targets --locked -- -D warnings
run "rust tests" cargo test --release --workspace --locked
run "end-to-end (pusher-js, laravel-echo, pusher SDK)" bash -c "cd tests/js && npm test"
run "HTTP API against docs/openapi.yaml (schemathesis)" bash tests/api/run.sh
run "fuzz smoke (cargo-fuzz on stable, 30 s per target)" bash fuzz/smoke.sh
if [ -f benches/smoke.sh ]; then run "belfry-bench smoke" bash benches/smoke.sh; fi
if [ -f tests/ops/check.sh ]; then run "deployment checks" bash tests/ops/check.sh; fi

echo
if [ ${#failed[@]} -eq 0 ]; then
  echo "belfry: all suites passed"
  exit 0
fi
printf 'belfry: failed suites: %s\n' "${failed[*]}"
exit 1
