"""Datastore images and label files of the ibisagent task: what a datastore image is (a 2D image or a volume, its
shape), which slice a request works on, an uploaded initial mask read as that slice, and the result written as the
label file MONAI Label returns. Slices are cut with `ibisagent.geometry`; files are read by `ibisagent.io`, which checks
their headers against `MAX_IMAGE_PIXELS` / `MAX_VOLUME_VOXELS` (or the bounds passed in) before reading any data.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ibisagent.geometry import AXES, put_slice, slice_shape, voxel_to_pixel
from ibisagent.io import (
    MAX_IMAGE_PIXELS,
    MAX_VOLUME_VOXELS,
    NIFTI_SUFFIXES,
    RASTER_SUFFIXES,
    ImageReadError,
    probe_image,
    read_mask,
)

from .errors import RequestError

_ANY_SIZE = 2**62  # probing reads headers only, so any declared size can be looked at and compared


@dataclass(frozen=True)
class ImageSource:
    """A datastore image: `kind` "2d" (PNG/JPG/TIFF/BMP, one DICOM file, a 2D NIfTI) or "volume" (3D NIfTI);
    `shape` the voxel shape of a volume, (H, W) of a 2D image."""

    image_id: str
    path: str
    kind: str
    shape: tuple[int, ...]
    mtime_ns: int
    nifti: bool

    @classmethod
    def open(
        cls, image_id: str, path: str, max_pixels: int = MAX_IMAGE_PIXELS, max_voxels: int = MAX_VOLUME_VOXELS
    ) -> ImageSource:
        """The datastore image at `path`, described from its file's header only (no pixel is decoded): a 2D image
        over `max_pixels` pixels, or a volume over `max_voxels` voxels or with a slice over `max_pixels`, is a 400."""
        p = Path(path)
        if p.is_dir():
            raise RequestError(
                400,
                f"image {image_id!r} is a DICOM series folder; this task reads NIfTI volumes (MONAI Label converts "
                "DICOMweb series with MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=true), PNG/JPG/TIFF and single DICOM files",
            )
        if not p.is_file():
            raise RequestError(404, f"image {image_id!r} has no file in the datastore")
        mtime = p.stat().st_mtime_ns
        try:
            info = probe_image(p, max_pixels=max_pixels, max_voxels=max_voxels)
            if info.kind == "nifti" and len(info.shape) == 3:
                for axis in AXES:  # a volume's every slice must be readable
                    height, width = slice_shape(info.shape, axis)
                    if height * width > max_pixels:
                        raise ImageReadError(
                            f"{p}: its slices along axis {axis} are {width}x{height} pixels, above the limit of "
                            f"max_pixels={max_pixels}"
                        )
        except ImageReadError as exc:
            detail = str(exc).replace(str(p), "the file")  # the datastore's paths mean nothing to the client
            raise RequestError(400, f"image {image_id!r} cannot be read: {detail}") from exc
        if info.kind != "nifti":
            return cls(image_id, str(p), "2d", info.shape, mtime, False)
        if len(info.shape) == 2:
            return cls(image_id, str(p), "2d", (info.shape[1], info.shape[0]), mtime, True)
        return cls(image_id, str(p), "volume", info.shape, mtime, True)

    def resolve_slice(self, slice_index: int | None, axis: int | None, points3d: list[list[float]]):
        """(slice, axis) of the request: (None, 2) for a 2D image; for a volume the given slice, else the slice all
        3-number points lie in, else 0 when the volume has one slice along the axis."""
        if self.kind == "2d":
            if slice_index not in (None, 0):
                raise RequestError(
                    400, f"params.slice={slice_index} is out of range: image {self.image_id!r} is 2D; give slice null"
                )
            return None, 2
        axis = 2 if axis is None else axis
        n = self.shape[axis]
        if slice_index is None:
            ks = {voxel_to_pixel(p, axis)[0] for p in points3d} or ({0} if n == 1 else set())
            if len(ks) != 1:
                detail = "its points lie in several slices" if ks else "it has no [i, j, k] points"
                raise RequestError(
                    400,
                    f"params.slice is missing and {detail}; image {self.image_id!r} is a volume of shape "
                    f"{list(self.shape)}: give slice 0..{n - 1} (axis {axis})",
                )
            slice_index = ks.pop()
        if not 0 <= slice_index < n:
            raise RequestError(
                400,
                f"params.slice={slice_index} is out of range: image {self.image_id!r} has slices 0..{n - 1} "
                f"along axis {axis} (shape {list(self.shape)})",
            )
        return slice_index, axis

    def slice_shape(self, axis: int) -> tuple[int, int]:
        """(H, W) of the 2D image a request works on."""
        if self.kind == "2d":
            return self.shape[0], self.shape[1]
        return slice_shape(self.shape, axis)


def read_label(
    path: str, source: ImageSource, slice_index: int | None, axis: int, shape: tuple[int, int]
) -> np.ndarray:
    """An uploaded initial mask -> HxW bool: a PNG/JPG of the slice's size (foreground = first channel > 0), or a
    NIfTI of the volume's shape (the request's slice is taken; a scaled label's value > 0 is decided on its raw
    values), or for a 2D image a NIfTI of shape (W, H[, 1]). The shape is checked from the file's header before any
    data is read, so an upload never takes more memory than one slice of its image."""
    height, width = shape
    if not path.lower().endswith(RASTER_SUFFIXES + NIFTI_SUFFIXES):
        raise RequestError(400, "the label upload must be a PNG/JPG mask or a NIfTI (.nii, .nii.gz) label")
    try:
        # the header only, whatever size it declares: the shape must be the image's, checked below
        info = probe_image(path, max_pixels=_ANY_SIZE, max_voxels=_ANY_SIZE)
    except ImageReadError as exc:
        raise _unreadable(exc, path) from exc
    if info.kind == "raster" and info.shape != (height, width):
        raise RequestError(
            400,
            f"the label upload is a {info.shape[1]}x{info.shape[0]} image but the slice is {width}x{height} "
            "(width x height); send a mask of the slice's size",
        )
    if info.kind == "nifti":
        _check_nifti_label(info.shape, source, shape)
    try:
        if info.kind == "nifti" and source.kind != "volume":
            return read_mask(path, shape, None, 2)  # (W, H) or (W, H, 1): the one (i, j) plane
        return read_mask(path, shape, slice_index, axis)
    except ImageReadError as exc:
        raise _unreadable(exc, path) from exc


def _check_nifti_label(label_shape: tuple[int, ...], source: ImageSource, shape: tuple[int, int]) -> None:
    height, width = shape
    if source.kind == "volume":
        if label_shape != source.shape:
            raise RequestError(
                400,
                f"the label upload has shape {list(label_shape)} but image {source.image_id!r} has shape "
                f"{list(source.shape)}; send a label volume of the image's shape",
            )
    elif label_shape not in ((width, height), (width, height, 1)):  # Slicer stores a 2D labelmap as one slice
        raise RequestError(
            400,
            f"the label upload has shape {list(label_shape)} but the {width}x{height} image needs a NIfTI of "
            f"shape [{width}, {height}] (i = column, j = row)",
        )


def _unreadable(exc: ImageReadError, path: str) -> RequestError:
    detail = str(exc).replace(str(path), "the upload")  # the server's temp path means nothing to the client
    return RequestError(400, f"the label upload cannot be read: {detail}")


def write_label(mask: np.ndarray, source: ImageSource, slice_index: int | None, axis: int) -> str:
    """The final mask as a temporary file MONAI Label sends and then deletes: uint8, 1 = foreground. 2D images give
    a PNG (a NIfTI for a NIfTI image); volumes a NIfTI of the volume's shape, the mask in the given slice."""
    mask = np.asarray(mask, np.uint8)
    if not source.nifti:
        from PIL import Image

        with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
            Image.fromarray(mask).save(f, format="PNG")
            return f.name
    if source.kind == "volume":
        data = np.zeros(source.shape, np.uint8)
        put_slice(data, slice_index, axis, mask)
    else:
        data = np.ascontiguousarray(mask.T)
    return _save_like(data, source)


def write_volume_label(label: np.ndarray, source: ImageSource) -> str:
    """A whole (I, J, K) label volume as a temporary NIfTI MONAI Label sends and then deletes: uint8, 1 = foreground,
    with the image's affine and header (the volume task's result)."""
    if source.kind != "volume" or tuple(label.shape) != tuple(source.shape):
        raise ValueError(f"label shape {label.shape} is not the volume's shape {source.shape}")
    return _save_like(np.asarray(label, np.uint8), source)


def _save_like(data: np.ndarray, source: ImageSource) -> str:
    """`data` (uint8) as a temporary NIfTI with the image's affine and header, unscaled."""
    import nibabel as nib

    ref = nib.load(source.path)
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(data.shape)
    image = nib.Nifti1Image(data, ref.affine, header)
    image.header.set_slope_inter(1, 0)
    with tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False) as f:
        path = f.name
    nib.save(image, path)
    return path


def read_volume(source: ImageSource) -> np.ndarray:
    """The whole (I, J, K) voxel array of a volume source (its size was checked from the header by `ImageSource.open`):
    stored values, scaled to float32 only when the file has a scale other than 1 / 0."""
    import nibabel as nib

    try:
        image = nib.load(source.path)
        slope, inter = image.dataobj.slope, image.dataobj.inter
        scaled = any(v is not None and np.isfinite(v) and v != d for v, d in ((slope, 1), (inter, 0)))
        if not scaled:
            data = np.asanyarray(image.dataobj.get_unscaled())
        else:
            data = image.get_fdata(dtype=np.float32)
    except Exception as exc:  # a truncated or corrupt file
        raise RequestError(
            400, f"image {source.image_id!r} cannot be read: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != tuple(source.shape):
        raise RequestError(400, f"image {source.image_id!r} has shape {list(data.shape)}, not a 3D volume")
    return data
