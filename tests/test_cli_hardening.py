"""`ibisagent segment` and `oracle` against bad arguments and hostile files (issue #18): each is one line on stderr
starting with "ibisagent: error:", exit code 2, no traceback, and nothing decoded or allocated that the file only
claims. Runs `ibisagent.cli.main` in-process with the classical tool on a tiny image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ibisagent.cli import main
from ibisagent.trajectory import encode_mask
from ibisagent.types import MAX_INSTRUCTION_CHARS
from tests.test_io_hardening import MiB, nifti_header, peak_of, png_bomb, write_gz

H, W = 24, 32


@pytest.fixture
def files(tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8)).save(image)
    mask = tmp_path / "gt.png"
    m = np.zeros((H, W), np.uint8)
    m[5:15, 8:20] = 255
    Image.fromarray(m).save(mask)
    (tmp_path / "a_file").write_text("x")
    return tmp_path, image, mask


def _replay(tmp_path, content) -> str:
    path = tmp_path / "replay.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _trajectory(**changes) -> dict:
    d = {"version": "1", "instruction": "segment t", "image_size": [H, W], "targets": ["t"], "steps": []}
    d.update(changes)
    return d


def _bomb_png(tmp_path) -> str:
    path = tmp_path / "bomb.png"
    png_bomb(path, 10_000, 10_000)
    return str(path)


def _garbage_png(tmp_path) -> str:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"\x89PNG garbage")
    return str(path)


def _big_nii(tmp_path) -> str:
    path = tmp_path / "big.nii"
    path.write_bytes(nifti_header((2048, 2048, 1024)))
    return str(path)


def _gz_bomb(tmp_path) -> str:
    path = tmp_path / "bomb.nii.gz"
    write_gz(path, nifti_header((4096, 4096, 4)), 64 * MiB)
    return str(path)


# name: (a function of (tmp_path, image, mask) -> the arguments after "segment", words of the message)
CASES = {
    "--max-steps 0": (lambda t, i, m: [i, "-i", "x", "--gt-mask", m, "--max-steps", "0"], "--max-steps must be"),
    "--max-steps -3": (lambda t, i, m: [i, "-i", "x", "--gt-mask", m, "--max-steps", "-3"], "at least 1"),
    "--out is a file": (lambda t, i, m: [i, "-i", "x", "--gt-mask", m, "--out", str(t / "a_file")], "is a file"),
    "--out under a file": (
        lambda t, i, m: [i, "-i", "x", "--gt-mask", m, "--out", str(t / "a_file" / "sub")],
        "cannot create",
    ),
    "an instruction of 2001 characters": (
        lambda t, i, m: [i, "-i", "x" * 2001, "--gt-mask", m],
        f"at most {MAX_INSTRUCTION_CHARS}",
    ),
    "--replay of broken JSON": (lambda t, i, m: [i, "-i", "x", "--replay", _replay(t, "{not json")], "--replay"),
    "--replay of a JSON list": (lambda t, i, m: [i, "-i", "x", "--replay", _replay(t, "[1, 2]")], "object"),
    "--replay of binary bytes": (lambda t, i, m: [i, "-i", "x", "--replay", _replay(t, b"\xff\xfe\x00")], "--replay"),
    "--replay nested 100000 deep": (
        lambda t, i, m: [i, "-i", "x", "--replay", _replay(t, "[" * 100_000 + "]" * 100_000)],
        "JSON",
    ),
    "--replay with counts that wrap int64": (
        lambda t, i, m: [
            i,
            "-i",
            "x",
            "--replay",
            _replay(t, _trajectory(initial_masks={"t": {"size": [H, W], "counts": [2**63, 2**63, H * W]}})),
        ],
        "sum to",
    ),
    "--replay declaring a gigapixel image": (
        lambda t, i, m: [i, "-i", "x", "--replay", _replay(t, _trajectory(image_size=[50000, 50000]))],
        "image_size",
    ),
    "--replay without targets": (
        lambda t, i, m: [
            i,
            "-i",
            "x",
            "--replay",
            _replay(t, {"version": "1", "instruction": "x", "image_size": [H, W]}),
        ],
        "targets",
    ),
    "--replay is a folder": (lambda t, i, m: [i, "-i", "x", "--replay", str(t)], "no such file"),
    "an image of garbage bytes": (lambda t, i, m: [_garbage_png(t), "-i", "x", "--gt-mask", m], "not a readable image"),
    "a PNG pixel bomb image": (lambda t, i, m: [_bomb_png(t), "-i", "x", "--gt-mask", m], "max_pixels"),
    "a NIfTI image claiming 4 GiB": (lambda t, i, m: [_big_nii(t), "-i", "x", "--gt-mask", m], "max_voxels"),
    "an initial mask claiming 4 GiB": (
        lambda t, i, m: [i, "-i", "x", "--gt-mask", m, "--initial-mask", _big_nii(t)],
        "max_voxels",
    ),
    "a gzip bomb initial mask": (
        lambda t, i, m: [i, "-i", "x", "--gt-mask", m, "--initial-mask", _gz_bomb(t)],
        "mask is 4096x4096",
    ),
    "a PNG bomb ground truth": (lambda t, i, m: [i, "-i", "x", "--gt-mask", _bomb_png(t)], "mask is 10000x10000"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_segment_input_is_one_clear_line_and_exit_code_2(name, files, capsys, monkeypatch):
    tmp_path, image, mask = files
    monkeypatch.chdir(tmp_path)
    make, words = CASES[name]
    args = ["segment", *make(tmp_path, str(image), str(mask))]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    capsys.readouterr()
    result = {}
    peak, error = peak_of(lambda: result.update(code=main(args)))
    err = capsys.readouterr().err
    assert error is None and result["code"] == 2, f"{name}: {error!r} {result}\n{err}"
    assert err.startswith("ibisagent: error:") and words in err, f"{name}: {err}"
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, f"{name}: {err}"
    assert len(err) < 1000
    assert peak < 64 * MiB, f"{name}: {peak / MiB:.0f} MiB"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--max-clicks", "0"], "--max-clicks must be at least 1"),
        (["--stop-iou", "1.5"], "--stop-iou must be in (0, 1]"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_bad_oracle_numbers_are_usage_errors(args, words, tmp_path, capsys):
    assert main(["oracle", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ibisagent: error:") and words in err


def test_good_runs_still_work_and_replay(files, capsys):
    tmp_path, image, mask = files
    out = tmp_path / "out"
    instruction = "segment the t " + "x" * (MAX_INSTRUCTION_CHARS - 14)
    assert main(["segment", str(image), "-i", instruction, "--gt-mask", str(mask), "--out", str(out)]) == 0
    assert (out / "trajectory.json").is_file() and (out / "mask.png").is_file()
    args = ["segment", str(image), "-i", "x", "--replay", str(out / "trajectory.json"), "--out", str(out / "again")]
    assert main(args) == 0
    assert (out / "again" / "mask.png").read_bytes() == (out / "mask.png").read_bytes()
    assert encode_mask(np.zeros((2, 2), bool)) == {"size": [2, 2], "counts": [4]}
