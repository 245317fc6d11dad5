"""The `ibisagent` command line on the shared demo: outputs, and one clear line for each kind of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ibisagent.cli import main
from ibisagent.io import read_mask
from tests.conftest import DEMO, needs_demo

IMAGE = DEMO / "demo" / "20_ultrasound_breast.png"
MASK = DEMO / "demo_mask" / "20_ultrasound_breast_tumor.png"


@needs_demo
def test_segment_with_oracle_writes_mask_trajectory_and_overlays(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            str(IMAGE),
            "-i",
            "segment the breast tumor",
            "--gt-mask",
            str(MASK),
            "--out",
            str(out),
            "--max-steps",
            "8",
            "--profile",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "stopped:" in printed and "tool ms" in printed
    traj = json.loads((out / "trajectory.json").read_text())
    assert traj["version"] == "1" and traj["targets"] == ["breast tumor"]
    assert traj["steps"][0]["clicks"]["breast tumor"][0]["positive"] is True
    mask = read_mask(out / "mask.png")
    gt = read_mask(MASK)
    assert (mask & gt).sum() / (mask | gt).sum() > 0.7
    overlays = sorted(out.glob("step_*.png"))
    assert overlays and Image.open(overlays[0]).size == (1024, 1024)
    # the saved trajectory replays to the same mask
    code = main(
        [
            "segment",
            str(IMAGE),
            "-i",
            "segment the breast tumor",
            "--replay",
            str(out / "trajectory.json"),
            "--out",
            str(tmp_path / "replay"),
        ]
    )
    assert code == 0 and np.array_equal(read_mask(tmp_path / "replay" / "mask.png"), mask)


@needs_demo
def test_oracle_table(tmp_path, capsys):
    code = main(
        [
            "oracle",
            str(DEMO),
            "--limit",
            "2",
            "--max-clicks",
            "5",
            "--markdown",
            str(tmp_path / "t.md"),
            "--csv",
            str(tmp_path / "t.csv"),
        ]
    )
    assert code == 0
    table = (tmp_path / "t.md").read_text()
    assert "| all | 2 |" in table and "NoC@85" in table
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "nope.png", "-i", "x", "--gt-mask", "m.png"], "nope.png: no such file"),
        (["segment", str(IMAGE), "-i", "segment the tumor"], "give exactly one policy"),
        (["segment", str(IMAGE), "-i", "  ", "--gt-mask", str(MASK)], "--instruction is empty"),
        (["segment", str(IMAGE), "-i", "x", "--replay", "missing.json"], "missing.json: no such file"),
        (
            ["segment", str(IMAGE), "-i", "x", "--gt-mask", str(MASK), "--tool", "classical", "--checkpoint", "w.pt"],
            "takes no checkpoint",
        ),
        (["oracle", "/nonexistent/folder"], "no such folder"),
    ],
)
@needs_demo
def test_bad_input_is_one_clear_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ibisagent: error:") and message in err and len(err.splitlines()) == 1


@needs_demo
def test_wrong_mask_shape(tmp_path, capsys):
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small)
    assert main(["segment", str(IMAGE), "-i", "x", "--gt-mask", str(small), "--out", str(tmp_path / "o")]) == 2
    assert "mask is 10x10 but the image is 1024x1024" in capsys.readouterr().err


def test_unknown_tool_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["segment", "a.png", "-i", "x", "--tool", "magic"])
    assert info.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err
