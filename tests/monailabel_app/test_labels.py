"""The server's image and label reading (`monailabel_app.lib.labels`) against hostile files (issue #18): studies and
label uploads are checked from their headers (pixel and voxel bounds, the label's shape against its image) before any
data is read; a scaled NIfTI label is thresholded on its raw values. Called directly, without a server."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("monailabel")
nib = pytest.importorskip("nibabel")

from PIL import Image  # noqa: E402

from monailabel_app.lib import labels  # noqa: E402
from monailabel_app.lib.errors import RequestError  # noqa: E402
from tests.test_io_hardening import MiB, nifti_header, peak_of, png_bomb, write_gz  # noqa: E402

SHAPE = (40, 30, 12)  # the study volume, (I, J, K)


@pytest.fixture
def volume(tmp_path) -> labels.ImageSource:
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), np.eye(4)), path)
    return labels.ImageSource.open("ct", str(path))


@pytest.fixture
def picture(tmp_path) -> labels.ImageSource:
    path = tmp_path / "us.png"
    Image.fromarray(np.zeros((20, 25), np.uint8)).save(path)
    return labels.ImageSource.open("us", str(path))


def _refused(fn, status: int, *words: str) -> RequestError:
    peak, error = peak_of(fn)
    assert isinstance(error, RequestError), repr(error)
    assert error.status_code == status, error.detail
    for w in words:
        assert w in error.detail, error.detail
    assert peak < 8 * MiB, f"{peak / MiB:.0f} MiB allocated before the refusal"
    return error


def test_good_studies_open_as_before(volume, picture):
    assert (volume.kind, volume.shape, volume.nifti) == ("volume", SHAPE, True)
    assert (picture.kind, picture.shape, picture.nifti) == ("2d", (20, 25), False)
    assert volume.slice_shape(2) == (30, 40) and labels.MAX_IMAGE_PIXELS == 2**26


# -- studies ---------------------------------------------------------------------------------------------------------


def test_a_png_study_over_the_pixel_bound_is_refused_from_its_header(tmp_path):
    path = tmp_path / "big.png"
    png_bomb(path, 10_000, 10_000)
    _refused(lambda: labels.ImageSource.open("big", str(path)), 400, "image 'big'", "10000x10000", "max_pixels")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(small)
    _refused(lambda: labels.ImageSource.open("s", str(small), max_pixels=5000), 400, "max_pixels=5000")


def test_a_nifti_study_claiming_4_gib_is_refused_from_its_header(tmp_path):
    path = tmp_path / "big.nii"
    path.write_bytes(nifti_header((2048, 2048, 1024)))
    _refused(lambda: labels.ImageSource.open("big", str(path)), 400, "image 'big'", "max_voxels")


@pytest.mark.parametrize(
    "fields, words",
    [({"datatype": 128, "bitpix": 24}, "voxel type"), ({"vox_offset": 1e30}, "data offset")],
)
def test_a_study_with_a_damaged_header_is_a_400(fields, words, tmp_path):
    path = tmp_path / "bad.nii"
    path.write_bytes(nifti_header((4, 4, 4), **fields) + bytes(512))
    error = _refused(lambda: labels.ImageSource.open("bad", str(path)), 400, words)
    assert str(tmp_path) not in error.detail  # the datastore's paths are not shown


# -- label uploads ---------------------------------------------------------------------------------------------------


def test_a_nifti_label_claiming_4_gib_is_refused(volume, tmp_path):
    path = tmp_path / "tmpabc.nii"
    path.write_bytes(nifti_header((2048, 2048, 1024)))
    error = _refused(lambda: labels.read_label(str(path), volume, 3, 2, (30, 40)), 400, "label upload")
    assert "tmpabc" not in error.detail


def test_a_gzip_bomb_label_of_another_shape_is_refused_before_decompression(volume, tmp_path):
    path = tmp_path / "tmpbomb.nii.gz"
    write_gz(path, nifti_header((4096, 4096, 4)), 64 * MiB)  # 64 MiB of zeros, ~65 KB on disk
    _refused(
        lambda: labels.read_label(str(path), volume, 3, 2, (30, 40)),
        400,
        "the label upload has shape [4096, 4096, 4]",
        "[40, 30, 12]",
    )


def test_a_label_cut_short_is_a_400(volume, tmp_path):
    path = tmp_path / "tmpshort.nii.gz"
    write_gz(path, nifti_header(SHAPE), 100)
    _refused(
        lambda: labels.read_label(str(path), volume, 11, 2, (30, 40)), 400, "label upload cannot be read", "cut short"
    )


@pytest.mark.parametrize("slope, inter", [(3.0, -1.0), (-2.0, 1.0)])
def test_a_scaled_label_is_thresholded_on_its_raw_values(slope, inter, volume, tmp_path):
    vol = np.random.default_rng(0).integers(0, 2, SHAPE, dtype=np.uint8)
    path = tmp_path / "tmpscaled.nii.gz"
    write_gz(path, nifti_header(SHAPE, slope=slope, inter=inter), data=vol.tobytes(order="F"))
    for axis, index in ((2, 5), (0, 7), (1, 29)):
        shape = volume.slice_shape(axis)
        mask = labels.read_label(str(path), volume, index, axis, shape)
        assert np.array_equal(mask, np.take(vol * slope + inter, index, axis).T > 0)


def test_png_labels_are_checked_from_their_header(picture, tmp_path):
    bomb = tmp_path / "tmpbomb.png"
    png_bomb(bomb, 8000, 8000)  # 64 M pixels, within PIL's limit: decoding would take 64 MB
    _refused(
        lambda: labels.read_label(str(bomb), picture, None, 2, (20, 25)),
        400,
        "the label upload is a 8000x8000 image but the slice is 25x20",
    )
    good = tmp_path / "tmpgood.png"
    Image.fromarray((np.arange(500).reshape(20, 25) % 3 == 0).astype(np.uint8) * 255).save(good)
    assert labels.read_label(str(good), picture, None, 2, (20, 25)).sum() == 167


def test_a_2d_nifti_label_keeps_slicer_shapes(picture, tmp_path):
    for shape in ((25, 20), (25, 20, 1)):
        path = tmp_path / "tmp2d.nii.gz"
        data = np.zeros(shape, np.uint8)
        data[3, 4] = 1
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
        mask = labels.read_label(str(path), picture, None, 2, (20, 25))
        assert mask.shape == (20, 25) and mask[4, 3] and mask.sum() == 1
    nib.save(nib.Nifti1Image(np.zeros((25, 20, 3), np.uint8), np.eye(4)), path)
    _refused(lambda: labels.read_label(str(path), picture, None, 2, (20, 25)), 400, "needs a NIfTI of shape [25, 20]")
