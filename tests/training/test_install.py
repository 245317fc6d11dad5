"""`pip install .` of the project works next to sam2, whose wheel also installs a top-level package `training`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_installed_training_entry_point_coexists_with_sam2(tmp_path):
    pytest.importorskip("sam2")
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    # Run from a folder outside the repository so that only installed packages can be imported.
    helped = subprocess.run(
        [str(target / "bin" / "ibisagent-train"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0, helped.stderr
    assert "trajectories" in helped.stdout
    probe = "import training, ibisagent_training, ibisagent; print(training.__file__); print(ibisagent_training.__file__); print(ibisagent.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert (Path(where[0]).parent / "trainer.py").is_file()  # `training` is still sam2's package
    assert where[1].startswith(str(target)) and where[2].startswith(str(target))
    assert (target / "ibisagent" / "templates").is_dir(), "prompt templates must ship in the wheel"
    cli = subprocess.run(
        [str(target / "bin" / "ibisagent"), "segment", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert cli.returncode == 0 and "--instruction" in cli.stdout
