"""Reading PNG, NIfTI slices and DICOM from the shared data; clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest

from ibisagent.datasets import list_biomedparse
from ibisagent.io import ImageReadError, read_image, read_mask, write_mask
from tests.conftest import RECIST, SHARED_DATA, needs_demo


@needs_demo
def test_biomedparse_listing(demo_dir):
    samples = list_biomedparse(demo_dir)
    assert len(samples) == 71
    s = next(s for s in samples if s.mask.name == "06_CT_abdomen_left+kidney.png")
    assert (s.target, s.modality, s.site, s.image.name) == ("left kidney", "CT", "abdomen", "06_CT_abdomen.png")
    assert {x.modality for x in samples} >= {
        "CT",
        "MRI",
        "X-Ray",
        "pathology",
        "ultrasound",
        "fundus",
        "endoscope",
        "dermoscopy",
        "OCT",
    }
    img = read_image(s.image)
    assert img.shape == (1024, 1024, 3) and img.dtype == np.uint8
    assert read_mask(s.mask, img.shape[:2]).any()


def test_nifti_slice_matches_the_volume(tmp_path):
    nib = pytest.importorskip("nibabel")
    npz = sorted(RECIST.glob("*.npz"))
    if not npz:
        pytest.skip(f"RECIST volumes not found in {RECIST}")
    data = np.load(npz[0])
    imgs, gts = data["imgs"], data["gts"]  # D x H x W
    k = int(np.argmax(gts.reshape(len(gts), -1).sum(1)))
    # NIfTI voxel order (i, j, k) = (x, y, z): put columns first so that a displayed slice equals imgs[k].
    vol = np.ascontiguousarray(np.transpose(imgs, (2, 1, 0)))
    lab = np.ascontiguousarray(np.transpose(gts, (2, 1, 0)).astype(np.uint8))
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "label.nii.gz")
    image = read_image(tmp_path / "ct.nii.gz", slice_index=k)
    assert image.shape == (*imgs.shape[1:], 3)
    assert np.corrcoef(image[..., 0].ravel().astype(float), imgs[k].ravel().astype(float))[0, 1] > 0.99
    assert np.array_equal(read_mask(tmp_path / "label.nii.gz", image.shape[:2], slice_index=k), gts[k] > 0)
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(tmp_path / "ct.nii.gz", slice_index=len(imgs))


def test_dicom_example():
    pytest.importorskip("pydicom")
    path = SHARED_DATA / "biomedparse-demo" / "examples" / "CT_lung_nodule.dcm"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    image = read_image(path)
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 10


def test_bad_files_give_one_clear_line(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="not a readable image"):
        read_image(junk)
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_image(junk.rename(tmp_path / "junk.xyz"))
    mask = write_mask(tmp_path / "m.png", np.ones((10, 20), bool))
    with pytest.raises(ImageReadError, match="mask is 20x10 but the image is 30x30"):
        read_mask(mask, (30, 30))
