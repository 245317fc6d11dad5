#!/usr/bin/env bash
# The main job: the IBISAgent MONAI Label server on sample studies, default configuration (classical tool).
# Sample studies are built once in $IBISAGENT_STUDIES (default ~/.cache/ibisagent/studies): links to the shared
# BiomedParse demo PNGs (read in place) and one CT volume converted from a shared RECIST .npz to NIfTI.
# Extra arguments go to `monailabel start_server`, e.g. `--conf model /models/ibisagent-7b --port 8001`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
shared=${IBISAGENT_SHARED:-$PWD/../shared/data}
studies=${IBISAGENT_STUDIES:-$HOME/.cache/ibisagent/studies}
mkdir -p "$studies"
.venv/bin/python - "$shared" "$studies" <<'PY'
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

shared, studies = Path(sys.argv[1]), Path(sys.argv[2])
demo = shared / "biomedparse-demo" / "biomedparse_datasets" / "BiomedParseData-Demo" / "demo"
if not demo.is_dir():
    sys.exit(f"serve.sh: sample data not found at {demo}; set IBISAGENT_SHARED to the shared data folder")
for png in sorted(demo.glob("*.png")):
    link = studies / png.name
    if not link.exists():
        link.symlink_to(png.resolve())
volume = studies / "ct_lesion_000001.nii.gz"
npz = sorted((shared / "medsam2-recist-npz").glob("*.npz"))
if npz and not volume.exists():
    data = np.load(npz[0])
    affine = np.diag([*[float(s) for s in data["spacing"]], 1.0]) if "spacing" in data else np.eye(4)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.transpose(data["imgs"], (2, 1, 0))), affine), volume)
print(f"sample studies: {studies} ({len(list(studies.glob('*.png')))} PNG images, {volume.name})")
PY
export PATH="$PWD/.venv/bin:$PATH"
exec monailabel start_server --app monailabel_app --studies "$studies" --host "${IBISAGENT_HOST:-127.0.0.1}" \
  --port "${IBISAGENT_PORT:-8000}" "$@"
