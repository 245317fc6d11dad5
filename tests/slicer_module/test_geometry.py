"""IBISAgentLib.geometry: RAS <-> IJK, slice axes, IJK <-> slice pixels, and the (K, J, I) array layout, checked
against the server's own slicing (`ibisagent.io.read_volume_slice`)."""

from __future__ import annotations

import numpy as np
import pytest
from IBISAgentLib import geometry as g

RNG = np.random.default_rng(0)


def oblique_ijk_to_ras(spacing=(0.7, 0.8, 2.5), origin=(-120.0, 35.0, 410.0)) -> np.ndarray:
    """A rotated, anisotropic IJK->RAS (as a DICOM CT with LPS flips and a tilt would have)."""
    a = np.deg2rad(17)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([-1, -1, 1])
    m = np.eye(4)
    m[:3, :3] = rot * np.asarray(spacing)
    m[:3, 3] = origin
    return m


def test_in_plane_axes_and_slice_shape():
    assert [g.in_plane_axes(a) for a in (0, 1, 2)] == [(1, 2), (0, 2), (0, 1)]
    dims = (30, 20, 10)  # (I, J, K)
    assert g.slice_shape(dims, 2) == (20, 30)  # rows j, columns i
    assert g.slice_shape(dims, 1) == (10, 30)  # rows k, columns i
    assert g.slice_shape(dims, 0) == (10, 20)  # rows k, columns j
    with pytest.raises(ValueError, match="slice axis must be 0, 1 or 2"):
        g.in_plane_axes(3)


def test_ras_ijk_round_trip():
    m = oblique_ijk_to_ras()
    ijk = RNG.uniform(-5, 60, size=(50, 3))
    ras = g.ijk_to_ras(ijk, m)
    np.testing.assert_allclose(ras, ijk @ m[:3, :3].T + m[:3, 3])
    np.testing.assert_allclose(g.ras_to_ijk(ras, m), ijk, atol=1e-9)
    single = g.ijk_to_ras([1, 2, 3], m)
    assert single.shape == (3,)
    np.testing.assert_allclose(g.ras_to_ijk(single, m), [1, 2, 3], atol=1e-9)
    with pytest.raises(ValueError, match="4x4"):
        g.ijk_to_ras([0, 0, 0], np.eye(3))


def test_ras_to_voxel_index_is_the_containing_voxel():
    m = oblique_ijk_to_ras()
    # voxel i covers continuous IJK [i - 0.5, i + 0.5): centres round to themselves, +-0.49 stays, +0.5 moves on
    for offset, expected in ((0.0, 7), (0.49, 7), (-0.49, 7), (0.5, 8), (-0.51, 6)):
        ras = g.ijk_to_ras([7 + offset, 3, 4], m)
        assert g.ras_to_ijk_index(ras, m).tolist() == [expected, 3, 4]
    assert g.slice_index_from_ras(g.ijk_to_ras([5, 6, 11.3], m), m, 2) == 11
    assert g.slice_index_from_ras(g.ijk_to_ras([5, 6, 11.3], m), m, 0) == 5


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_axis_from_normal(axis):
    # spacing 0.5 x 0.5 x 5 must not bias the choice; the normal is the IJK direction of `axis`, slightly tilted
    m = oblique_ijk_to_ras(spacing=(0.5, 0.5, 5.0))
    direction = m[:3, axis] / np.linalg.norm(m[:3, axis])
    assert g.slice_axis_from_normal(direction + 0.2 * RNG.normal(size=3) * 0.3, m) == axis
    assert g.slice_axis_from_normal(-direction, m) == axis
    # IJK axes permuted relative to RAS: i along S, j along R, k along A
    perm = np.eye(4)[:, [2, 0, 1, 3]]
    assert g.slice_axis_from_normal([0, 0, 1], perm) == 0  # an axial view cuts along i
    assert g.slice_axis_from_normal([0, 1, 0], perm) == 2  # a coronal view along k


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_pixel_ijk_conventions(axis):
    # the documented mapping: axis 2 -> (x, y) = (i, j); axis 1 -> (i, k); axis 0 -> (j, k); centres at +0.5
    voxel = np.array([4.0, 9.0, 13.0])
    expected_xy = {2: (4.5, 9.5), 1: (4.5, 13.5), 0: (9.5, 13.5)}[axis]
    np.testing.assert_allclose(g.ijk_to_pixel(voxel, axis), expected_xy)
    back = g.pixel_to_ijk(expected_xy, axis, int(voxel[axis]))
    np.testing.assert_allclose(back, voxel)
    assert g.ijk_index_to_pixel_index(voxel.astype(int), axis) == tuple(int(v - 0.5) for v in expected_xy)
    assert g.pixel_index_to_ijk_index(*expected_xy, axis, int(voxel[axis])) == tuple(int(v) for v in voxel)
    # a click at an integer voxel index (x = i) and one at the pixel centre (x = i + 0.5) show on the same voxel
    for xy in (np.floor(expected_xy), expected_xy):
        np.testing.assert_allclose(g.pixel_to_voxel_centre(xy, axis, int(voxel[axis])), voxel)
    many = RNG.uniform(0, 40, size=(20, 3))
    many[:, axis] = 6
    np.testing.assert_allclose(g.pixel_to_ijk(g.ijk_to_pixel(many, axis), axis, 6), many)


def test_array_from_volume_layout_is_kji():
    """VTK keeps voxels with i fastest (flat index i + I*(j + J*k)); slicer.util.arrayFromVolume reshapes that
    buffer to (K, J, I). ijk_array_to_kji must give exactly that array from an (I, J, K) array."""
    dims = (5, 4, 3)
    vol_ijk = RNG.integers(0, 1000, size=dims)
    vtk_buffer = vol_ijk.ravel(order="F")  # i fastest, as VTK stores it
    array_from_volume = vtk_buffer.reshape(dims[::-1])  # what arrayFromVolume returns
    np.testing.assert_array_equal(g.ijk_array_to_kji(vol_ijk), array_from_volume)
    np.testing.assert_array_equal(g.kji_array_to_ijk(array_from_volume), vol_ijk)
    i, j, k = 3, 1, 2
    assert array_from_volume[k, j, i] == vol_ijk[i, j, k] == vtk_buffer[i + dims[0] * (j + dims[1] * k)]
    assert g.dims_ijk_of_kji(array_from_volume) == dims


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_kji_slice_is_the_servers_slice_image(tmp_path, axis):
    """The HxW slice the server shows the model (ibisagent.io.read_volume_slice on the NIfTI) is kji_slice of the
    arrayFromVolume-layout array, with no transpose; so a trajectory mask writes straight into the labelmap."""
    nib = pytest.importorskip("nibabel")
    from ibisagent.io import read_volume_slice

    vol_ijk = RNG.integers(0, 30000, size=(9, 7, 5)).astype(np.int16)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(vol_ijk, np.eye(4)), str(path))
    kji = g.ijk_array_to_kji(vol_ijk)
    for s in range(vol_ijk.shape[axis]):
        server = read_volume_slice(path, s, axis)
        mine = g.kji_slice(kji, axis, s)
        assert server.shape == mine.shape == g.slice_shape(vol_ijk.shape, axis)
        np.testing.assert_array_equal(server, mine)
    # and a voxel index maps to the pixel that shows it
    voxel = (6, 2, 3)
    x, y = g.ijk_index_to_pixel_index(voxel, axis)
    assert read_volume_slice(path, voxel[axis], axis)[y, x] == vol_ijk[voxel]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_write_slice_mask(axis):
    dims = (9, 7, 5)
    labelmap = np.zeros(dims[::-1], np.uint8)
    labelmap[...] = 0
    s = 2
    h, w = g.slice_shape(dims, axis)
    mask = RNG.random((h, w)) > 0.5
    other = np.zeros(dims[::-1], np.uint8)
    other_view = g.kji_slice(other, axis, s)
    other_view[0, 0] = 3  # another label on the slice
    labelmap += other
    g.kji_slice(labelmap, axis, s)[-1, -1] = 1  # label 1 outside the new mask is cleared
    mask[-1, -1] = False
    mask[0, 0] = False
    g.write_slice_mask(labelmap, mask, axis, s)
    view = g.kji_slice(labelmap, axis, s)
    np.testing.assert_array_equal(view == 1, mask)
    assert view[0, 0] == 3 and view[-1, -1] == 0
    assert np.count_nonzero(labelmap == 1) == mask.sum()  # nothing on other slices
    # pixel (x, y) of the mask is voxel (i, j, k) through the IJK view
    y, x = np.argwhere(mask)[0]
    voxel = g.pixel_index_to_ijk_index(x, y, axis, s)
    assert g.kji_array_to_ijk(labelmap)[voxel] == 1


def test_write_slice_mask_errors():
    labelmap = np.zeros((5, 7, 9), np.uint8)  # (K, J, I) of dims (9, 7, 5)
    with pytest.raises(ValueError, match=r"mask is 9x7 \(HxW\) but slice 1 along IJK axis 2 is 7x9"):
        g.write_slice_mask(labelmap, np.zeros((9, 7), bool), 2, 1)
    with pytest.raises(ValueError, match=r"slice 5 is out of range; IJK axis 2 has slices 0..4"):
        g.write_slice_mask(labelmap, np.zeros((7, 9), bool), 2, 5)
