"""Hostile RLE masks and trajectory JSON against the core reader (issue #18): every malformed input is one ValueError
(`TrajectoryFormatError`) with a message, raised before anything is allocated; counts that wrap int64 (a segmentation
fault in numpy's `repeat` before) and sizes of gigapixels are refused from the numbers alone.

`HOSTILE_RLES` and `HOSTILE_TRAJECTORIES` are shared with the Slicer library's test
(`tests/slicer_module/test_library_hardening.py`), whose reader mirrors this one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ibisagent import trajectory as core
from ibisagent.trajectory import Trajectory, TrajectoryFormatError, decode_mask, encode_mask
from tests.test_io_hardening import MiB, peak_of

# name: (RLE, words the message must contain)
HOSTILE_RLES = {
    "counts that wrap int64 to H*W": ({"size": [2, 2], "counts": [2**62, 2**62, 2**62, 2**62, 4]}, "sum to"),
    "a 50000x50000 mask of one run": ({"size": [50000, 50000], "counts": [2_500_000_000]}, "pixels"),
    "a 20000x20000 mask of two runs": ({"size": [20000, 20000], "counts": [0, 400_000_000]}, "limit"),
    "a negative run": ({"size": [2, 2], "counts": [-1, 5]}, "non-negative"),
    "a count beyond int64": ({"size": [1, 10**30], "counts": [10**30]}, "pixels"),
    "a count of 10**30 in a small mask": ({"size": [2, 2], "counts": [10**30, 0]}, "sum to"),
    "float counts": ({"size": [2, 2], "counts": [1.5, 2.5]}, "integers"),
    "boolean counts": ({"size": [2, 2], "counts": [True, True, True, True]}, "integers"),
    "string counts": ({"size": [2, 2], "counts": ["4"]}, "integers"),
    "counts a string": ({"size": [2, 2], "counts": "4"}, "list"),
    "counts a number": ({"size": [2, 2], "counts": 4}, "list"),
    "counts nested": ({"size": [2, 2], "counts": [[4]]}, "integers"),
    "no counts": ({"size": [2, 2]}, "counts"),
    "no size": ({"counts": [4]}, "size"),
    "size of one number": ({"size": [4], "counts": [4]}, "size"),
    "size of three numbers": ({"size": [1, 2, 2], "counts": [4]}, "size"),
    "negative size": ({"size": [-2, -2], "counts": [4]}, "size"),
    "zero size": ({"size": [0, 5], "counts": []}, "size"),
    "float size": ({"size": [2.0, 2.0], "counts": [4]}, "size"),
    "string size": ({"size": ["2", "2"], "counts": [4]}, "size"),
    "boolean size": ({"size": [True, 4], "counts": [4]}, "size"),
    "size a number": ({"size": 4, "counts": [4]}, "size"),
    "counts short of H*W": ({"size": [3, 3], "counts": [4, 4]}, "sum to 8, expected 9"),
    "not an object": ([[2, 2], [4]], "object"),
    "null": (None, "object"),
}


@pytest.mark.parametrize("name", list(HOSTILE_RLES))
def test_hostile_rle_is_a_clear_value_error_before_any_allocation(name):
    rle, words = HOSTILE_RLES[name]
    peak, error = peak_of(lambda: decode_mask(rle))
    assert isinstance(error, ValueError), f"{name}: {error!r}"
    assert words in str(error), f"{name}: {error}"
    assert peak < 1 * MiB, f"{name}: {peak / MiB:.0f} MiB"


def test_good_rles_round_trip_and_the_bound_is_an_argument():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    assert np.array_equal(decode_mask(encode_mask(mask)), mask)
    assert np.array_equal(decode_mask({"size": [2, 3], "counts": [0, 6]}), np.ones((2, 3), bool))
    assert decode_mask({"size": [2, 3], "counts": np.array([6])}).shape == (2, 3)  # numpy counts too
    assert core.MAX_MASK_PIXELS == 2**26
    with pytest.raises(ValueError, match="2000 pixels.*max_pixels=1000"):
        decode_mask(encode_mask(np.zeros((40, 50), bool)), max_pixels=1000)


def _good() -> dict:
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2:4] = True
    step = {
        "index": 0,
        "text": "x",
        "action": {"clicks": [{"x": 2.5, "y": 1.5, "positive": True, "target": "t"}], "terminate": False},
        "clicks": {"t": [{"x": 2.5, "y": 1.5, "positive": True, "target": "t"}]},
        "masks": {"t": encode_mask(mask)},
    }
    return {"version": "1", "instruction": "segment t", "image_size": [4, 5], "targets": ["t"], "steps": [step]}


def _with(**changes) -> dict:
    d = _good()
    for path, value in changes.items():
        where = d
        keys = path.split("__")
        for k in keys[:-1]:
            where = where[int(k)] if isinstance(where, list) else where[k]
        where[keys[-1]] = value
    return d


# name: (trajectory dict or JSON text, words the message must contain)
HOSTILE_TRAJECTORIES = {
    "a list": ([1, 2], "object"),
    "no image_size": ({k: v for k, v in _good().items() if k != "image_size"}, "image_size"),
    "a terapixel image_size": (_with(image_size=[10**6, 10**6]), "image_size"),
    "image_size of strings": (_with(image_size=["4", "5"]), "image_size"),
    "steps not a list": (_with(steps="abc"), "steps"),
    "a step not an object": (_with(steps=[7]), "steps[0]"),
    "masks not an object": (_with(steps__0__masks=[1]), "steps[0]"),
    "a mask of another size": (_with(steps__0__masks={"t": {"size": [2, 2], "counts": [4]}}), "[4, 5]"),
    "a wrapping mask": (_with(steps__0__masks={"t": {"size": [4, 5], "counts": [2**63, 2**63, 20]}}), "sum to"),
    "an initial mask of a gigapixel": (
        _with(initial_masks={"t": {"size": [50000, 50000], "counts": [2_500_000_000]}}),
        "initial_masks",
    ),
    "a click without x": (_with(steps__0__clicks={"t": [{"y": 1, "positive": True}]}), "steps[0]"),
    "a click at 1e400": (_with(steps__0__clicks={"t": [{"x": 10**400, "y": 1, "positive": True}]}), "steps[0]"),
    "clicks not a list": (_with(steps__0__clicks={"t": 5}), "steps[0]"),
    "JSON nested 100000 deep": ("[" * 100_000 + "]" * 100_000, "JSON"),
    "not JSON": ("{not json", "JSON"),
    "a lone surrogate": ('{"version": "1", "instruction": "\\ud800", "image_size": [4, 5], "targets": []}', None),
}


@pytest.mark.parametrize("name", list(HOSTILE_TRAJECTORIES))
def test_hostile_trajectory_is_a_trajectory_format_error(name):
    data, words = HOSTILE_TRAJECTORIES[name]
    text = data if isinstance(data, str) else json.dumps(data)
    if words is None:  # readable: a string with a lone surrogate is still a string
        Trajectory.from_json(text)
        return
    peak, error = peak_of(lambda: Trajectory.from_json(text))
    assert isinstance(error, TrajectoryFormatError) and isinstance(error, ValueError), f"{name}: {error!r}"
    assert words in str(error), f"{name}: {error}"
    assert peak < 64 * MiB


def test_good_trajectory_still_reads():
    traj = Trajectory.from_dict(_good())
    assert traj.final_mask.sum() == 4 and traj.num_clicks == 1
