#!/usr/bin/env bash
# Run the test suite in the pinned environment (created on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# tests/test_report_browser.py opens the eval HTML report in headless Chromium (Debian's package): install it once
# where possible (root with apt-get, as in CI); the test itself tries the same and otherwise skips with the reason.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q --no-install-recommends chromium || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }; } >/dev/null \
    || echo "[test] chromium could not be installed; the report browser test will be skipped" >&2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -ra "$@"
