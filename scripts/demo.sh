#!/usr/bin/env bash
# The main job: the agent loop with the default (classical) tool on a shared demo image, driven by the oracle
# policy from the demo's ground-truth mask. Writes ./ibisagent-out (mask, trajectory JSON, one overlay per step).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
demo=${IBISAGENT_DEMO:-../shared/data/biomedparse-demo/biomedparse_datasets/BiomedParseData-Demo}
exec .venv/bin/ibisagent segment "$demo/demo/06_CT_abdomen.png" \
  --instruction "segment the liver" --gt-mask "$demo/demo_mask/06_CT_abdomen_liver.png" \
  --out ibisagent-out --profile "$@"
