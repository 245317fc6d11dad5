"""Reading images and masks from disk (PNG/JPG, a slice of a NIfTI volume, a DICOM file) and writing masks.

Every reader returns arrays in the project's one frame: row = y, column = x of the displayed image.
Errors are `ImageReadError` with one line that names the file and what to do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ibisagent.geometry import take_slice
from ibisagent.tools.base import as_rgb_uint8

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageReadError(ValueError):
    """An image or mask file could not be used; the message names the file and the problem."""


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(RASTER_SUFFIXES):
        return "raster"
    return "unknown"


def window(array: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map intensities to uint8: [lo, hi] (default: the 0.5 and 99.5 percentiles) -> [0, 255]."""
    a = np.asarray(array, np.float32)
    if lo is None or hi is None:
        finite = a[np.isfinite(a)]
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def read_volume_slice(path: str | Path, slice_index: int | None = None, axis: int = 2) -> np.ndarray:
    """One 2D slice of a NIfTI volume as a float32 HxW array.

    The volume's voxel array is indexed (i, j, k); axis 2 gives axial slices for RAS-like volumes. Pixels follow
    `ibisagent.geometry` (axis 2: rows follow j, columns i, as viewers display an (i, j) plane).
    slice_index None picks the middle slice.
    """
    import nibabel as nib

    path = Path(path)
    try:
        vol = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ImageReadError(f"{path}: not a readable NIfTI volume ({exc})") from exc
    if vol.ndim == 4 and vol.shape[3] == 1:
        vol = vol[..., 0]
    if vol.ndim == 2:
        return vol.T.astype(np.float32)
    if vol.ndim != 3:
        raise ImageReadError(f"{path}: expected a 3D volume, got shape {vol.shape}")
    if axis not in (0, 1, 2):
        raise ImageReadError(f"{path}: slice axis must be 0, 1 or 2, got {axis}")
    n = vol.shape[axis]
    index = n // 2 if slice_index is None else slice_index
    if not 0 <= index < n:
        raise ImageReadError(f"{path}: slice {index} is out of range; axis {axis} has slices 0..{n - 1}")
    return take_slice(vol, index, axis).astype(np.float32)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable DICOM image ({exc})") from exc
    arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[arr.shape[0] // 2]
    if arr.ndim == 2:
        center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
        if center is not None and width is not None:
            c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
            w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
            return window(arr, c - w / 2, c + w / 2)
        return window(arr)
    return as_rgb_uint8(arr)


def read_image(path: str | Path, slice_index: int | None = None, axis: int = 2) -> np.ndarray:
    """Any supported image file -> HxWx3 uint8 RGB. Volumes give one slice (see `read_volume_slice`)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    kind = _kind(path)
    if kind == "raster":
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise ImageReadError(f"{path}: not a readable image ({exc})") from exc
    if kind == "nifti":
        return as_rgb_uint8(window(read_volume_slice(path, slice_index, axis)))
    if kind == "dicom":
        return as_rgb_uint8(_read_dicom(path))
    raise ImageReadError(f"{path}: unsupported file type; use PNG/JPG/BMP/TIFF, NIfTI (.nii, .nii.gz) or DICOM (.dcm)")


def read_mask(
    path: str | Path, shape: tuple[int, int] | None = None, slice_index: int | None = None, axis: int = 2
) -> np.ndarray:
    """A binary mask file -> HxW bool (foreground = first channel > 0). `shape` (H, W), when given, is enforced."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such mask file")
    kind = _kind(path)
    if kind == "raster":
        try:
            with Image.open(path) as im:
                arr = np.asarray(im)
        except Exception as exc:
            raise ImageReadError(f"{path}: not a readable mask image ({exc})") from exc
        mask = (arr[..., 0] if arr.ndim == 3 else arr) > 0
    elif kind == "nifti":
        mask = read_volume_slice(path, slice_index, axis) > 0
    elif kind == "dicom":
        mask = _read_dicom(path)[..., 0] > 0
    else:
        raise ImageReadError(f"{path}: unsupported mask file type; use PNG or NIfTI")
    if shape is not None and mask.shape != tuple(shape):
        raise ImageReadError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {shape[1]}x{shape[0]} (width x height); give a mask of the image's size"
        )
    return mask


def write_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Write an HxW bool mask as an 8-bit PNG (0 / 255)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).save(path)
    return path


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """Write an HxWx3 uint8 image as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
