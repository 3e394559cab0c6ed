#!/usr/bin/env bash
# Fuzz smoke run for the test command: every cargo-fuzz target for
# FUZZ_SECONDS (default 30) on the stable toolchain, each from a copy of its
# corpus so the checkout stays clean. cargo-fuzz's instrumentation flags are
# unstable, so the build runs with RUSTC_BOOTSTRAP=1 and no sanitizer
# (-s none), with debug assertions on (integer overflow panics). A crash
# fails the run and leaves the input in fuzz/artifacts/<target>/.
# Longer runs: docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-30}
targets=${FUZZ_TARGETS:-"websocket_frames client_messages api_signature envelopes"}

echo "toolchain: $(rustc --version)"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none -a
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in $targets; do
  mkdir -p "$work/$t"
  cp corpus/"$t"/* "$work/$t/"
  echo "== $t: ${seconds}s"
  rc=0
  cargo fuzz run -s none -a "$t" "$work/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -print_final_stats=1 >"$work/$t.log" 2>&1 || rc=$?
  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$work/$t.log" || true
  if [ "$rc" -ne 0 ]; then
    tail -40 "$work/$t.log"
    echo "fuzz target $t failed (exit $rc); the input is in fuzz/artifacts/$t/"
    exit 1
  fi
done
