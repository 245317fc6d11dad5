"""ibisagent.geometry: the voxel <-> slice pixel rule, and the Slicer library's mirror of it agreeing on every axis."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ibisagent import geometry as g

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slicer_module" / "IBISAgent"))
from IBISAgentLib import geometry as slicer_g  # noqa: E402

RNG = np.random.default_rng(0)


def test_slice_shape_and_take_slice_agree():
    vol = RNG.integers(0, 100, size=(7, 5, 3))
    for axis in g.AXES:
        for s in range(vol.shape[axis]):
            img = g.take_slice(vol, s, axis)
            assert img.shape == g.slice_shape(vol.shape, axis)
    # axis 2: rows follow j, columns i
    assert g.take_slice(vol, 1, 2)[4, 6] == vol[6, 4, 1]
    assert g.take_slice(vol, 2, 0)[2, 3] == vol[2, 3, 2]


@pytest.mark.parametrize("axis", g.AXES)
def test_voxel_pixel_round_trip_names_the_same_voxel(axis):
    vol = RNG.integers(0, 1000, size=(6, 8, 9))
    for _ in range(50):
        ijk = [int(RNG.integers(0, n)) for n in vol.shape]
        s, x, y = g.voxel_to_pixel(ijk, axis)
        assert s == ijk[axis]
        assert g.take_slice(vol, s, axis)[int(y), int(x)] == vol[tuple(ijk)]
        assert g.pixel_to_voxel(x, y, s, axis) == tuple(float(v) for v in ijk)


def test_put_slice_inverts_take_slice_and_checks_the_shape():
    vol = np.zeros((4, 5, 6), np.uint8)
    for axis in g.AXES:
        img = RNG.integers(0, 2, size=g.slice_shape(vol.shape, axis)).astype(np.uint8)
        g.put_slice(vol, 1, axis, img)
        assert np.array_equal(g.take_slice(vol, 1, axis), img)
    with pytest.raises(ValueError, match="HxW"):
        g.put_slice(vol, 0, 2, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="slice axis must be 0, 1 or 2"):
        g.slice_shape((4, 5, 6), 3)


@pytest.mark.parametrize("axis", g.AXES)
def test_the_slicer_library_mirrors_the_core_rule(axis):
    """IBISAgentLib.geometry cannot import ibisagent (it runs in Slicer's Python); both must give the same slices."""
    vol_ijk = RNG.integers(0, 1000, size=(9, 7, 5))
    vol_kji = slicer_g.ijk_array_to_kji(vol_ijk)
    assert slicer_g.in_plane_axes(axis) == g.in_plane_axes(axis)
    assert slicer_g.slice_shape(vol_ijk.shape, axis) == g.slice_shape(vol_ijk.shape, axis)
    for s in range(vol_ijk.shape[axis]):
        assert np.array_equal(slicer_g.kji_slice(vol_kji, axis, s), g.take_slice(vol_ijk, s, axis))
    for _ in range(30):
        x, y = RNG.uniform(0, 5, size=2)
        s = int(RNG.integers(0, vol_ijk.shape[axis]))
        core = tuple(int(np.floor(v)) for v in g.pixel_to_voxel(x, y, s, axis))
        assert slicer_g.pixel_index_to_ijk_index(x, y, axis, s) == core
