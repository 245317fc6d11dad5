#!/usr/bin/env bash
# Create (or reuse) the pinned virtual environment in .venv and install the project into it, editable.
# Re-runs are instant unless setup.py or constraints.txt changed.
# `bootstrap.sh slicer` instead makes .venv-slicer: slicer-core, numpy and pytest only (no torch, no project package),
# as Slicer's own Python, for tests/slicer_core; instant unless constraints-slicer.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = slicer ]; then
  VENV=${IBISAGENT_SLICER_VENV:-.venv-slicer}
  stamp="$VENV/.ibisagent-stamp"
  want=$(sha256sum < constraints-slicer.txt | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
  fi
  echo "[bootstrap] installing slicer-core into $VENV (first run: under a minute, about 1 GB)" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  PIP_CONSTRAINT="$PWD/constraints-slicer.txt" PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$VENV/bin/pip" install -q slicer-core numpy pytest pytest-timeout
  echo "$want" > "$stamp"
  exit 0
fi
VENV=${IBISAGENT_VENV:-.venv}
stamp="$VENV/.ibisagent-stamp"
want=$(cat setup.py constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
echo "[bootstrap] installing the pinned environment into $VENV (first run: about 5 minutes, 4 GB)" >&2
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
export PIP_CONSTRAINT="$PWD/constraints.txt" SAM2_BUILD_CUDA=0 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: its CPU wheel must be present before anything that depends on torch resolves.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[all,test]"
echo "$want" > "$stamp"
