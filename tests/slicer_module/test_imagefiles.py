"""IBISAgentLib.imagefiles: the NIfTI the Slicer module uploads and the PNG initial mask, read back by the server's
own readers (nibabel, ibisagent.io), and NIfTI labels written the server's way read by the module."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from IBISAgentLib import geometry as g
from IBISAgentLib import imagefiles

nib = pytest.importorskip("nibabel")
RNG = np.random.default_rng(1)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.uint16, np.int32, np.float64])
@pytest.mark.parametrize("compress", [True, False])
def test_nifti_written_from_kji_reads_as_ijk_in_nibabel(tmp_path, dtype, compress):
    kji = (RNG.normal(size=(6, 5, 4)) * 100).astype(dtype)  # (K, J, I) as arrayFromVolume gives
    m = np.array([[0.0, -0.8, 0.0, 10.0], [0.7, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, 30.0], [0, 0, 0, 1]])
    path = imagefiles.write_nifti(tmp_path / ("v.nii.gz" if compress else "v.nii"), kji, m)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    assert data.shape == (4, 5, 6) and data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(data, g.kji_array_to_ijk(kji))  # voxel (i, j, k) preserved
    assert data[3, 1, 2] == kji[2, 1, 3]
    np.testing.assert_allclose(img.affine, m, atol=1e-6)
    np.testing.assert_allclose(img.header.get_zooms(), [0.7, 0.8, 2.5], atol=1e-6)
    back, affine = imagefiles.read_nifti(path)
    np.testing.assert_array_equal(back, kji)
    np.testing.assert_allclose(affine, m, atol=1e-6)


def test_nifti_bool_and_errors():
    data = imagefiles.nifti_bytes(np.ones((2, 3, 4), bool))
    arr, _ = imagefiles.read_nifti(data)
    assert arr.dtype == np.uint8 and arr.shape == (2, 3, 4) and arr.all()
    with pytest.raises(ValueError, match="3D"):
        imagefiles.nifti_bytes(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="float16 cannot be written"):
        imagefiles.nifti_bytes(np.zeros((2, 2, 2), np.float16))
    with pytest.raises(ValueError, match="not a NIfTI-1 file"):
        imagefiles.read_nifti(gzip.compress(b"x" * 400))


def test_server_written_label_reads_as_kji(tmp_path):
    """The server writes a volume label with nibabel from an (I, J, K) array, the mask in one slice
    (monailabel_app: data[..., k] = mask.T); read_nifti returns the arrayFromVolume layout."""
    dims = (8, 6, 5)
    mask = RNG.random(g.slice_shape(dims, 2)) > 0.5  # HxW of an axis-2 slice
    data = np.zeros(dims, np.uint8)
    data[:, :, 3] = mask.T
    img = nib.Nifti1Image(data, np.diag([0.5, 0.5, 3.0, 1.0]))
    img.header.set_slope_inter(1, 0)
    path = tmp_path / "label.nii.gz"
    nib.save(img, str(path))
    kji, affine = imagefiles.read_nifti(path.read_bytes())
    assert kji.shape == (5, 6, 8)
    np.testing.assert_array_equal(g.kji_slice(kji, 2, 3) > 0, mask)
    assert kji.sum() == mask.sum()
    np.testing.assert_allclose(affine, np.diag([0.5, 0.5, 3.0, 1.0]))


def test_nifti_scaling_is_applied(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.0, -1.0)
    path = tmp_path / "s.nii"
    nib.save(img, str(path))
    kji, _ = imagefiles.read_nifti(path)
    np.testing.assert_allclose(g.kji_array_to_ijk(kji), data * 2.0 - 1.0)


def test_png_mask_is_read_by_pil_and_the_server(tmp_path):
    from PIL import Image

    from ibisagent.io import read_mask

    mask = RNG.random((13, 21)) > 0.6  # H=13, W=21
    path = imagefiles.write_png_mask(tmp_path / "m.png", mask)
    with Image.open(path) as im:
        assert im.size == (21, 13) and im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im) > 0, mask)
    np.testing.assert_array_equal(read_mask(path, shape=(13, 21)), mask)
    with pytest.raises(ValueError, match="HxW"):
        imagefiles.png_mask_bytes(np.zeros((2, 3, 4), bool))
