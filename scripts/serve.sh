#!/usr/bin/env bash
# The main job: the IBISAgent MONAI Label server on sample studies, default configuration (classical tool).
# Sample studies are built once in $IBISAGENT_STUDIES (default ~/.cache/ibisagent/studies): links to the shared
# BiomedParse demo PNGs (read in place) and one CT volume converted from a shared RECIST .npz to NIfTI.
# Extra arguments go to `monailabel start_server`, e.g. `--conf model /models/ibisagent-7b --port 8001`.
# Nothing is written into the checkout: the app runs from $IBISAGENT_RUNTIME (default ~/.cache/ibisagent/server).
# IBISAGENT_HOST other than loopback needs IBISAGENT_API_TOKEN (see monailabel_app/README.md, "Access").
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
if npz:
    # The .npz holds SimpleITK's view: imgs (z, y, x), spacing/origin (x, y, z) and a row-major direction, all in
    # ITK's LPS space. NIfTI stores voxel (i, j, k) = (x, y, z) with a voxel -> RAS affine.
    data = np.load(npz[0])
    lps = np.eye(4)
    direction = np.asarray(data["direction"], float).reshape(3, 3) if "direction" in data else np.eye(3)
    lps[:3, :3] = direction @ np.diag(np.asarray(data["spacing"], float))
    lps[:3, 3] = np.asarray(data["origin"], float) if "origin" in data else 0.0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    if not volume.exists() or not np.allclose(nib.load(str(volume)).affine, affine, atol=1e-4):
        nib.save(nib.Nifti1Image(np.ascontiguousarray(np.transpose(data["imgs"], (2, 1, 0))), affine), volume)
print(f"sample studies: {studies} ({len(list(studies.glob('*.png')))} PNG images, {volume.name})")
PY
# MONAI Label creates model/, logs/ and bin/ inside --app and logs there: run the app from a folder outside the
# checkout that links to its code, and log to that folder (INFO: no session ids or instructions are logged).
runtime=${IBISAGENT_RUNTIME:-$HOME/.cache/ibisagent/server}
mkdir -p "$runtime/app" "$runtime/logs"
ln -sfn "$PWD/monailabel_app/main.py" "$runtime/app/main.py"
ln -sfn "$PWD/monailabel_app/lib" "$runtime/app/lib"
cat > "$runtime/logging.json" <<JSON
{"version": 1, "disable_existing_loggers": false,
 "formatters": {"simple": {"format": "[%(asctime)s] [%(levelname)s] (%(name)s) - %(message)s"}},
 "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple"},
              "file": {"class": "logging.handlers.RotatingFileHandler", "formatter": "simple",
                       "filename": "$runtime/logs/app.log", "maxBytes": 10485760, "backupCount": 3}},
 "root": {"level": "INFO", "handlers": ["console", "file"]}}
JSON
export PATH="$PWD/.venv/bin:$PATH" PYTHONDONTWRITEBYTECODE=1
export MONAI_LABEL_SESSION_PATH="$runtime/sessions"
exec monailabel start_server --app "$runtime/app" --studies "$studies" --host "${IBISAGENT_HOST:-127.0.0.1}" \
  --port "${IBISAGENT_PORT:-8000}" --log_config "$runtime/logging.json" "$@"
