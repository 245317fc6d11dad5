#!/usr/bin/env bash
# Run the test suite in the pinned environment (created on first use). Extra arguments go to pytest.
# Then, on a full run (no arguments) or in CI (CI=true), the slicer-core suite (tests/slicer_core): the Slicer module
# on Slicer's own libraries in a second environment, .venv-slicer (created on first use).
# `test.sh slicer [pytest arguments]` runs only the slicer-core suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
run_slicer_suite() {
  bash scripts/bootstrap.sh slicer
  .venv-slicer/bin/python -m pytest -c tests/slicer_core/pytest.ini --rootdir . -ra "$@"
}
if [ "${1:-}" = slicer ]; then
  shift
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  run_slicer_suite "$@"
  exit
fi
# tests/test_report_browser.py opens the eval HTML report in headless Chromium (Debian's package): install it once
# where possible (root with apt-get, as in CI); the test itself tries the same and otherwise skips with the reason.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q --no-install-recommends chromium || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }; } >/dev/null \
    || echo "[test] chromium could not be installed; the report browser test will be skipped" >&2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ $# -gt 0 ] && [ "${CI:-}" != true ]; then
  exec .venv/bin/python -m pytest -ra "$@"
fi
status=0
.venv/bin/python -m pytest -ra "$@" || status=$?
echo "[test] the slicer-core suite (tests/slicer_core, .venv-slicer)" >&2
run_slicer_suite || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
exit "$status"
