#!/usr/bin/env bash
# Operations checks: helm lint + render + Kubernetes schema validation of the chart, docker-compose config,
# Prometheus config, Dockerfile sanity, dashboard and docs. Installs what it needs on a fresh Debian machine
# (root, apt and PyPI reachable) and is fast on the second run.
# Last line: "ops: N passed, M failed".
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}"
VENV="${BELFRY_OPS_VENV:-$CACHE/belfry-ops-venv}"
REQ="$HERE/requirements.txt"

say() { echo "ops: $*"; }
die() { echo "ops: FATAL: $*" >&2; echo "ops: 0 passed, 1 failed"; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
  if [ "$APT_UPDATED" = 0 ]; then
    say "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || die "apt-get update failed"
    APT_UPDATED=1
  fi
  say "apt-get install -y $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

# 1. Python 3.11+ with venv (tomllib is needed).
PY="$(command -v python3 || true)"
if [ -z "$PY" ] || ! "$PY" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  apt_install python3 python3-venv
  PY="$(command -v python3)"
fi

# 2. The venv with helm-python-sdk and kubernetes-validate, rebuilt only when requirements.txt changes.
STAMP="$VENV/.belfry-ops-requirements"
if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$REQ" "$STAMP" \
   || ! "$VENV/bin/python" -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null; then
  say "creating venv $VENV"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV" || { apt_install python3-venv; rm -rf "$VENV"; "$PY" -m venv "$VENV"; } || die "python3 -m venv failed"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ" || die "pip install -r $REQ failed"
  cp "$REQ" "$STAMP"
else
  say "using venv $VENV"
fi

# 3. docker-compose (the v1 CLI from Debian; 'config' needs no Docker engine).
if ! command -v docker-compose >/dev/null; then
  apt_install docker-compose
fi

cd "$REPO"
exec "$VENV/bin/python" "$HERE/checks.py"
