"""Fixtures of the slicer-core suite (run in .venv-slicer: `bash scripts/test.sh slicer`); the harness module says
what is real and what stands in."""

from __future__ import annotations

import importlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed: run `bash scripts/test.sh slicer`")

from IBISAgentLib import write_nifti  # noqa: E402  (pytest.ini puts the module's folder on sys.path)

from tests.slicer_core.harness import COLS, RECIST, REPO, ROWS, erode, geometries, new_scene  # noqa: E402
from tests.slicer_module.serverprocess import running_server  # noqa: E402


@pytest.fixture
def scene():
    scene = new_scene()
    yield scene
    scene.Clear(True)


@pytest.fixture(scope="session")
def ibisagent_module():
    """slicer_module/IBISAgent/IBISAgent.py as Slicer imports it (its folder on sys.path), unchanged."""
    new_scene()
    return importlib.import_module("IBISAgent")


@pytest.fixture(scope="session")
def project_monailabel():
    """The `monailabel` command of the project environment (.venv, or IBISAGENT_VENV), which runs the server."""
    venv = Path(os.environ.get("IBISAGENT_VENV", REPO / ".venv"))
    if not venv.is_absolute():
        venv = REPO / venv
    command = venv / "bin" / "monailabel"
    if not command.is_file():
        pytest.skip(f"no project environment with monailabel at {venv}: run `bash scripts/bootstrap.sh` first")
    return str(command)


@pytest.fixture(scope="session")
def ct():
    """A CT lesion crop from the RECIST data: imgs and gts as (K, J, I) = (slice, row, column), the spacing
    (column, row, slice) in mm, and `click`: (k, j, i) of the lesion voxel deepest inside it."""
    files = sorted(RECIST.glob("*.npz"))
    if not files:
        pytest.skip(f"shared data not found at {RECIST}")
    data = np.load(files[0])
    imgs = np.ascontiguousarray(data["imgs"][:, ROWS, COLS]).astype(np.int16)
    gts = np.ascontiguousarray(data["gts"][:, ROWS, COLS] > 0)
    inside = gts
    while erode(inside).any():
        inside = erode(inside)
    points = np.argwhere(inside)
    click = tuple(int(v) for v in points[np.argmin(np.linalg.norm(points - points.mean(0), axis=1))])
    return {"imgs": imgs, "gts": gts, "spacing": np.asarray(data["spacing"], float), "click": click}


@pytest.fixture(scope="session")
def server(ct, tmp_path_factory, project_monailabel):
    """The real server (the weight-free classical tool and a tiny random policy model) on a studies folder holding the
    CT crop twice, written by IBISAgentLib's NIfTI writer: `ct-ras` with a right-handed affine and `ct-las` with a
    left-handed (LAS) one, the geometries of `geometries(ct)`."""
    tmp = tmp_path_factory.mktemp("slicer_core_server")
    studies = tmp / "studies"
    studies.mkdir()
    g = geometries(ct["spacing"])
    write_nifti(studies / "ct-ras.nii.gz", ct["imgs"], g["rh"])
    write_nifti(studies / "ct-las.nii.gz", ct["imgs"], g["lh"])
    # the policy: a tiny random Qwen2.5-VL built by the project environment (the slicer environment has no torch)
    policy = tmp / "tiny-vlm"
    build = f"from ibisagent.testing import build_tiny_qwen2_5_vl; build_tiny_qwen2_5_vl({str(policy)!r})"
    python = Path(project_monailabel).parent / "python"
    subprocess.run(
        [str(python), "-c", build], check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    conf = {"tool": "classical", "model": str(policy), "max_new_tokens": "24"}
    with running_server(tmp, studies, project_monailabel, conf) as (url, log):
        yield {"url": url, "studies": studies, "log": log}
