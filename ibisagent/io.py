"""Reading images and masks from disk (PNG/JPG, a slice of a NIfTI volume, a DICOM file) and writing masks.

Every reader returns arrays in the project's one frame: row = y, column = x of the displayed image.
Errors are `ImageReadError` with one line that names the file and what to do.

Files may come from anyone (an upload to the server, a path on the command line), so sizes are checked from the
file's header before any data is read or decoded, against two bounds that every reader takes as arguments:

- `MAX_IMAGE_PIXELS` (2**26, 64 Mi pixels, e.g. 8192 x 8192): the largest 2D image, volume slice or mask. PIL decodes
  lazily, so `Image.open(...).size` is checked first; a mask must also have its image's size, checked the same way.
- `MAX_VOLUME_VOXELS` (2**29, 512 Mi voxels, e.g. 512 x 512 x 2048): the largest NIfTI volume. Only the slice asked
  for is read (a block of planes at a time for axes 0 and 1), decompression stops at the bytes the header declares,
  and `scl_slope`/`scl_inter` scale that slice only; masks are thresholded on the raw values, never scaled.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ibisagent.geometry import check_axis, slice_shape
from ibisagent.tools.base import as_rgb_uint8

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")

MAX_IMAGE_PIXELS = 2**26
MAX_VOLUME_VOXELS = 2**29
_MAX_NIFTI_EXTENSIONS = 2**24  # bytes between the header and the data (extensions we skip unread)
_BLOCK_BYTES = 2**24  # planes read at once when a slice cuts across them (axes 0 and 1)


class ImageReadError(ValueError):
    """An image or mask file could not be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says: `kind` "raster" | "nifti" | "dicom"; `shape` (H, W) of a raster or DICOM image,
    the voxel shape (I, J[, K]) of a NIfTI (a 4D NIfTI with one time point is 3D)."""

    kind: str
    shape: tuple[int, ...]


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(RASTER_SUFFIXES):
        return "raster"
    return "unknown"


def _check_pixels(path: Path, height: int, width: int, max_pixels: int, what: str = "image") -> None:
    if height * width > max_pixels:
        raise ImageReadError(
            f"{path}: the {what} is {width}x{height} (width x height), {height * width} pixels, above the limit of "
            f"max_pixels={max_pixels}; downscale it or raise the limit (ibisagent.io.MAX_IMAGE_PIXELS)"
        )


def _mismatch(path: Path, got: tuple[int, int], shape: tuple[int, int]) -> ImageReadError:
    return ImageReadError(
        f"{path}: mask is {got[1]}x{got[0]} but the image is {shape[1]}x{shape[0]} (width x height); give a mask of "
        "the image's size"
    )


@contextlib.contextmanager
def _open_raster(path: Path, max_pixels: int, shape: tuple[int, int] | None = None) -> Iterator[Image.Image]:
    """The PIL image, its size checked (header only: PIL decodes on first use) against `max_pixels` and `shape`."""
    try:
        with warnings.catch_warnings():  # PIL's warning threshold is not ours: max_pixels decides below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: {exc}; the limit here is max_pixels={max_pixels}") from exc
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from exc
    with im:
        width, height = im.size
        if shape is not None and (height, width) != tuple(shape):
            raise _mismatch(path, (height, width), tuple(shape))
        _check_pixels(path, height, width, max_pixels, "mask" if shape is not None else "image")
        yield im


class _Nifti:
    """A NIfTI-1/2 file opened for reading slices: the header is parsed and checked at opening, data is read on
    request and never past the byte count the header declares (so a gzip bomb's tail is never decompressed)."""

    def __init__(self, path: Path, max_voxels: int):
        import nibabel as nib

        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 -- closed by close()
        try:
            compressed = self._file.read(2) == b"\x1f\x8b"
            self._file.seek(0)
            self._stream = gzip.GzipFile(fileobj=self._file, mode="rb") if compressed else self._file
            first = self._stream.read(4)
            sizes = {int.from_bytes(first, "little"), int.from_bytes(first, "big")} if len(first) == 4 else set()
            klass = nib.Nifti1Header if 348 in sizes else nib.Nifti2Header if 540 in sizes else None
            if klass is None:
                raise ImageReadError(f"{path}: not a NIfTI file (its first 4 bytes are not a NIfTI header size)")
            block = first + self._stream.read(klass.template_dtype.itemsize - 4)
            if len(block) < klass.template_dtype.itemsize:
                raise ImageReadError(f"{path}: the file ends inside its NIfTI header")
            header = klass(binaryblock=block, check=False)
            if header["magic"].item() not in (b"n+1", b"n+2"):
                raise ImageReadError(
                    f"{path}: not a single-file NIfTI (magic {header['magic'].item()!r}); save it as one .nii/.nii.gz"
                )
            shape = tuple(int(d) for d in header.get_data_shape())
            while len(shape) > 3 and shape[-1] == 1:
                shape = shape[:-1]
            if len(shape) not in (2, 3) or min(shape) < 1:
                raise ImageReadError(f"{path}: expected a 2D or 3D volume, the header declares shape {shape}")
            dtype = header.get_data_dtype()
            if dtype.kind not in "biuf":
                raise ImageReadError(
                    f"{path}: voxel type {dtype} is not supported; save the volume with an integer or float type"
                )
            voxels = math.prod(shape)
            if voxels > max_voxels:
                raise ImageReadError(
                    f"{path}: the header declares a volume of shape {shape}, {voxels} voxels, above the limit of "
                    f"{max_voxels} voxels (max_voxels={max_voxels}); crop or resample it, or raise the limit "
                    "(ibisagent.io.MAX_VOLUME_VOXELS)"
                )
            offset = float(header["vox_offset"])
            smallest = len(block) + 4
            if not smallest <= offset <= smallest + _MAX_NIFTI_EXTENSIONS:
                raise ImageReadError(
                    f"{path}: data offset (vox_offset) {offset:g} is outside {smallest}..{smallest + _MAX_NIFTI_EXTENSIONS}"
                    "; the header is damaged"
                )
            slope, inter = header.get_slope_inter()
            self.shape, self.dtype, self.offset = shape, dtype, int(offset)
            self.slope_inter = None if slope is None or (slope == 1 and inter == 0) else (float(slope), float(inter))
            self.end = self.offset + voxels * dtype.itemsize
            size = os.fstat(self._file.fileno()).st_size
            if not compressed and size < self.end:
                raise ImageReadError(
                    f"{path}: the header declares {voxels * dtype.itemsize} bytes of data from offset {self.offset} "
                    f"but the file has {size} bytes; the file is cut short or its header is wrong"
                )
        except ImageReadError:
            self.close()
            raise
        except Exception as exc:  # nibabel and gzip raise many types for damaged files
            self.close()
            raise ImageReadError(f"{path}: not a readable NIfTI volume ({type(exc).__name__}: {exc})") from exc

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _Nifti:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, start: int, count: int) -> np.ndarray:
        """`count` voxels from voxel index `start` (Fortran order), a 1D array of the file's dtype."""
        begin = self.offset + start * self.dtype.itemsize
        n = count * self.dtype.itemsize
        assert begin + n <= self.end  # never past the declared data
        try:
            self._stream.seek(begin)
            data = self._stream.read(n)
        except Exception as exc:  # a damaged gzip stream
            raise ImageReadError(f"{self.path}: the data cannot be read ({type(exc).__name__}: {exc})") from exc
        if len(data) != n:
            raise ImageReadError(
                f"{self.path}: the file ends before the {self.end - self.offset} bytes of data its header declares; "
                "it is cut short or its header is wrong"
            )
        return np.frombuffer(data, self.dtype)

    def slice_shape(self, axis: int) -> tuple[int, int]:
        """(H, W) of a slice along `axis` ((J, I) of a 2D NIfTI, whatever the axis)."""
        return (self.shape[1], self.shape[0]) if len(self.shape) == 2 else slice_shape(self.shape, axis)

    def raw_slice(self, slice_index: int | None, axis: int) -> np.ndarray:
        """The HxW slice image (see `ibisagent.geometry.take_slice`) in the file's values, native byte order."""
        if len(self.shape) == 2:
            out = self._read(0, math.prod(self.shape)).reshape(self.shape, order="F").T
        else:
            n = self.shape[axis]
            index = n // 2 if slice_index is None else slice_index
            if not 0 <= index < n:
                raise ImageReadError(f"{self.path}: slice {index} is out of range; axis {axis} has slices 0..{n - 1}")
            ni, nj, nk = self.shape
            plane = ni * nj
            if axis == 2:
                out = self._read(index * plane, plane).reshape((ni, nj), order="F").T
            else:
                # a slice across the (i, j) planes: read blocks of whole planes in file order, keep one line of each
                cols = np.empty((nj if axis == 0 else ni, nk), self.dtype)
                step = max(1, _BLOCK_BYTES // (plane * self.dtype.itemsize))
                for k0 in range(0, nk, step):
                    k1 = min(nk, k0 + step)
                    block = self._read(k0 * plane, (k1 - k0) * plane).reshape((ni, nj, k1 - k0), order="F")
                    cols[:, k0:k1] = block[index] if axis == 0 else block[:, index]
                out = cols.T
        return out.astype(out.dtype.newbyteorder("="), copy=False)


def _open_nifti(path: Path, max_voxels: int, max_pixels: int, axis: int) -> _Nifti:
    try:
        axis = check_axis(axis)
    except ValueError as exc:
        raise ImageReadError(f"{path}: {exc}") from exc
    nii = _Nifti(path, max_voxels)
    height, width = nii.slice_shape(axis)
    try:
        _check_pixels(path, height, width, max_pixels, f"slice along axis {axis}")
    except ImageReadError:
        nii.close()
        raise
    return nii


def _foreground(raw: np.ndarray, slope_inter: tuple[float, float] | None) -> np.ndarray:
    """raw * slope + inter > 0, decided on the raw values (no scaled copy): a threshold whose side follows the sign
    of the slope."""
    if slope_inter is None:
        return raw > 0
    slope, inter = slope_inter
    if slope == 0:
        return np.full(raw.shape, inter > 0)
    threshold = -inter / slope
    return raw > threshold if slope > 0 else raw < threshold


def probe_image(
    path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS, max_voxels: int = MAX_VOLUME_VOXELS
) -> ImageInfo:
    """The kind and shape of an image file from its header alone (see `ImageInfo`), checked against the bounds."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    kind = _kind(path)
    if kind == "raster":
        with _open_raster(path, max_pixels) as im:
            return ImageInfo("raster", (im.height, im.width))
    if kind == "nifti":
        with _Nifti(path, max_voxels) as nii:
            return ImageInfo("nifti", nii.shape)
    if kind == "dicom":
        return ImageInfo("dicom", _dicom_shape(_dicom_header(path), path, max_pixels, max_voxels))
    raise ImageReadError(f"{path}: unsupported file type; use PNG/JPG/BMP/TIFF, NIfTI (.nii, .nii.gz) or DICOM (.dcm)")


def window(array: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map intensities to uint8: [lo, hi] (default: the 0.5 and 99.5 percentiles) -> [0, 255]."""
    a = np.asarray(array, np.float32)
    if lo is None or hi is None:
        finite = a[np.isfinite(a)]
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def read_volume_slice(
    path: str | Path,
    slice_index: int | None = None,
    axis: int = 2,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_voxels: int = MAX_VOLUME_VOXELS,
) -> np.ndarray:
    """One 2D slice of a NIfTI volume as a float32 HxW array (scl_slope/scl_inter applied).

    The volume's voxel array is indexed (i, j, k); axis 2 gives axial slices for RAS-like volumes. Pixels follow
    `ibisagent.geometry` (axis 2: rows follow j, columns i, as viewers display an (i, j) plane).
    slice_index None picks the middle slice. Only that slice is read (see the module docstring for the bounds).
    """
    path = Path(path)
    with _open_nifti(path, max_voxels, max_pixels, axis) as nii:
        raw = nii.raw_slice(slice_index, axis)
        if nii.slope_inter is None:
            return raw.astype(np.float32)
        slope, inter = nii.slope_inter
        return (raw * slope + inter).astype(np.float32)


def _dicom_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(str(path))
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable DICOM image ({exc})") from exc


def _dicom_shape(ds, path: Path, max_pixels: int, max_voxels: int) -> tuple[int, int]:
    """(H, W) of the frame a DICOM file gives, from its header, after checking frame and total sizes."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable DICOM image (no valid Rows/Columns: {exc})") from exc
    _check_pixels(path, rows, cols, max_pixels)
    if rows * cols * frames > max_voxels:
        raise ImageReadError(
            f"{path}: {frames} frames of {cols}x{rows} are {rows * cols * frames} pixels, above the limit of "
            f"max_voxels={max_voxels} (ibisagent.io.MAX_VOLUME_VOXELS)"
        )
    return rows, cols


def _read_dicom(path: Path, max_pixels: int, max_voxels: int) -> np.ndarray:
    import pydicom

    ds = _dicom_header(path)
    _dicom_shape(ds, path, max_pixels, max_voxels)
    try:
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


def read_image(
    path: str | Path,
    slice_index: int | None = None,
    axis: int = 2,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_voxels: int = MAX_VOLUME_VOXELS,
) -> np.ndarray:
    """Any supported image file -> HxWx3 uint8 RGB. Volumes give one slice (see `read_volume_slice`).

    max_pixels / max_voxels: the bounds of the module docstring, checked from the header before decoding."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    kind = _kind(path)
    if kind == "raster":
        with _open_raster(path, max_pixels) as im:
            try:
                return np.asarray(im.convert("RGB"))
            except Exception as exc:
                raise ImageReadError(f"{path}: not a readable image ({exc})") from exc
    if kind == "nifti":
        slice_ = read_volume_slice(path, slice_index, axis, max_pixels=max_pixels, max_voxels=max_voxels)
        return as_rgb_uint8(window(slice_))
    if kind == "dicom":
        return as_rgb_uint8(_read_dicom(path, max_pixels, max_voxels))
    raise ImageReadError(f"{path}: unsupported file type; use PNG/JPG/BMP/TIFF, NIfTI (.nii, .nii.gz) or DICOM (.dcm)")


def read_mask(
    path: str | Path,
    shape: tuple[int, int] | None = None,
    slice_index: int | None = None,
    axis: int = 2,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_voxels: int = MAX_VOLUME_VOXELS,
) -> np.ndarray:
    """A binary mask file -> HxW bool (foreground = first channel > 0; a NIfTI's scaled value > 0).

    `shape` (H, W), when given, is enforced from the file's header before its data is read."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such mask file")
    kind = _kind(path)
    if kind == "raster":
        with _open_raster(path, max_pixels, shape) as im:
            try:
                arr = np.asarray(im)
            except Exception as exc:
                raise ImageReadError(f"{path}: not a readable mask image ({exc})") from exc
        mask = (arr[..., 0] if arr.ndim == 3 else arr) > 0
    elif kind == "nifti":
        with _open_nifti(path, max_voxels, max_pixels, axis) as nii:
            if shape is not None and nii.slice_shape(axis) != tuple(shape):
                raise _mismatch(path, nii.slice_shape(axis), tuple(shape))
            mask = _foreground(nii.raw_slice(slice_index, axis), nii.slope_inter)
    elif kind == "dicom":
        mask = _read_dicom(path, max_pixels, max_voxels)[..., 0] > 0
    else:
        raise ImageReadError(f"{path}: unsupported mask file type; use PNG or NIfTI")
    if shape is not None and mask.shape != tuple(shape):
        raise _mismatch(path, mask.shape, tuple(shape))
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
