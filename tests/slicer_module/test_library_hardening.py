"""The Slicer library against a hostile server (issue #18): every malformed RLE or trajectory JSON becomes the
library's own `TrajectoryFormatError` before any mask is allocated, and the HTTP client keeps a total deadline per
request, a bound on the body it reads, refuses redirects, and turns every failure into `IBISAgentClientError`."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from IBISAgentLib import trajectory as lib

from tests.test_trajectory_hardening import HOSTILE_RLES, HOSTILE_TRAJECTORIES

MiB = 2**20


def _peak(fn):
    tracemalloc.start()
    try:
        fn()
        error = None
    except BaseException as exc:  # noqa: BLE001 -- returned to the caller
        error = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, error


# -- the trajectory reader -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HOSTILE_RLES))
def test_hostile_rle_is_a_trajectory_format_error(name):
    rle, words = HOSTILE_RLES[name]
    peak, error = _peak(lambda: lib.decode_rle(rle))
    assert isinstance(error, lib.TrajectoryFormatError), f"{name}: {error!r}"
    assert words in str(error), f"{name}: {error}"
    assert peak < 1 * MiB, f"{name}: {peak / MiB:.0f} MiB"


@pytest.mark.parametrize("name", [n for n, (_, words) in HOSTILE_TRAJECTORIES.items() if words])
def test_hostile_trajectory_json_is_a_trajectory_format_error(name):
    data, words = HOSTILE_TRAJECTORIES[name]
    text = data if isinstance(data, str) else json.dumps(data)
    peak, error = _peak(lambda: lib.TrajectoryView.from_json(text))
    assert isinstance(error, lib.TrajectoryFormatError), f"{name}: {error!r}"
    assert peak < 64 * MiB


@pytest.mark.parametrize(
    "text",
    [
        b"\xff\xfe not utf-8",
        json.dumps({"version": "1", "image_size": [4, 5], "steps": [{"masks": {"t": "x"}}]}),
        json.dumps({"version": "1", "image_size": [4, 5], "initial_masks": [1, 2]}),
        json.dumps({"version": "1", "image_size": [4, 5], "steps": [{"index": "one"}]}),
        json.dumps({"version": "1", "image_size": [4, 5], "steps": [{"clicks": {"t": [None]}}]}),
        json.dumps({"version": "1", "image_size": [4, 5], "meta": [1]}),
        json.dumps({"version": "1" * 10_000}),
    ],
)
def test_every_malformed_field_is_the_library_error(text):
    with pytest.raises(lib.TrajectoryFormatError) as info:
        lib.TrajectoryView.from_json(text)
    assert len(str(info.value)) < 600


def test_masks_are_checked_when_read_so_mask_reads_cannot_fail():
    rle = {"size": [4, 5], "counts": [3, 4, 13]}
    view = lib.TrajectoryView.from_dict(
        {
            "version": "1",
            "image_size": [4, 5],
            "initial_masks": {"t": rle},
            "steps": [{"index": 0, "masks": {"t": rle}}],
        }
    )
    assert view.final_mask.sum() == 4 and view.initial_mask().sum() == 4
    assert lib.MAX_MASK_PIXELS == 2**26
